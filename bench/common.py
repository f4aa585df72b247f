"""What the align benches share with the TRL peers (`../shared/peers/trl_*.py`): the same tokenizer,
models, data and seeds, rebuilt line for line so both programs train on exactly the same work.

Each peer builds its byte-level BPE tokenizer (256 requested -> 260 entries with the four
specials), its Llama config and its data with `random.Random(seed)` in a fixed order; the
helpers below repeat those calls in the same order, then save the models with `save_pretrained`
so align loads them the way it loads any checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import resource
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
# ALIGN_SRC: another checkout's root to import align from (before/after comparisons); default this one.
SRC = os.environ.get("ALIGN_SRC", str(REPO))
if SRC not in sys.path:
    sys.path.insert(0, SRC)

SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
WORDS = "the a cat dog sat ran on under mat log red blue big small quick slow happy sad sun moon".split()


def build_tokenizer(corpus: list[str], vocab_size: int = 256) -> Any:
    """The peers' tokenizer: byte-level BPE with [PAD] [BOS] [EOS] [UNK], trained on `corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                   unk_token="[UNK]")


def llama_config(tok: Any, hidden: int, layers: int) -> Any:
    """The peers' model: Llama, 4 heads, intermediate 4*hidden, untied embeddings, 256 positions."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=256, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, num_labels=1, tie_word_embeddings=False)


def sft_work(root: Path, hidden: int, layers: int, pairs: int = 256, seed: int = 0,
             max_length: int = 64) -> tuple[Path, Path]:
    """`trl_sft.py`'s work: (model dir, train JSONL). Same rng calls in the same order as the peer.
    `max_length` > 64 only for the scaling curve (longer completions, see `pad_words`)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    rows = []
    for _ in range(pairs):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        rows.append((f"Q: {a}+{b}? A:", f" {a + b}. {words}."))
    tok = build_tokenizer([p + c for p, c in rows] * 4)
    model = AutoModelForCausalLM.from_config(llama_config(tok, hidden, layers))
    model_dir = root / "sft_model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = root / "sft.jsonl"
    with open(data, "w") as f:
        for p, c in rows:
            f.write(json.dumps({"prompt": p, "completion": c}) + "\n")
    return model_dir, data


def long_sft_data(root: Path, seq_len: int, pairs: int = 256, seed: int = 0) -> Path:
    """Scaling only: the same pairs with the completion padded by more words to about `seq_len`
    tokens (bytes: one token per character, as the 260-entry tokenizer learns no merges)."""
    rng = random.Random(seed)
    path = root / f"sft_len{seq_len}.jsonl"
    with open(path, "w") as f:
        for _ in range(pairs):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            prompt, words = f"Q: {a}+{b}? A:", f" {a + b}."
            while len(prompt) + len(words) < seq_len - 8:
                words += " " + rng.choice(WORDS)
            f.write(json.dumps({"prompt": prompt, "completion": words[: seq_len - 1 - len(prompt)] + "."}) + "\n")
    return path


def ppo_work(root: Path, hidden: int, layers: int, num_prompts: int = 64, seed: int = 0) -> dict[str, Path]:
    """`trl_ppo.py`'s work: policy (= reference), value model and reward model, each built from the
    config exactly as the peer builds them (the value and reward heads randomly initialised), and
    the prompt JSONL. Returns their paths."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    rng = random.Random(seed)
    corpus = []
    for _ in range(2000):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        corpus.append(f"Q: {a}+{b}? A: {a + b}. {words}.")
    tok = build_tokenizer(corpus)
    cfg = llama_config(tok, hidden, layers)
    policy = AutoModelForCausalLM.from_config(cfg)
    AutoModelForCausalLM.from_config(cfg)  # the peer's ref_policy draw (then overwritten by the policy's weights)
    value = AutoModelForSequenceClassification.from_config(cfg)
    reward = AutoModelForSequenceClassification.from_config(cfg)
    policy.generation_config.pad_token_id = tok.pad_token_id
    paths = {"policy": root / "policy", "value": root / "value", "reward": root / "reward"}
    for name, m in (("policy", policy), ("value", value), ("reward", reward)):
        m.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    prompts = [f"Q: {rng.randint(0, 99)}+{rng.randint(0, 99)}? A:" for _ in range(num_prompts)]
    paths["prompts"] = root / "prompts.jsonl"
    with open(paths["prompts"], "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")
    return paths


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB): every page the process touched and kept
    mapped: Python, the torch/transformers libraries, weights, activations, optimizer state."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


class Profiler:
    """`--profile`: cProfile around the timed call, top functions by cumulative and own time to stderr."""

    def __init__(self, enabled: bool, out: str | None = None, top: int = 40):
        self.enabled, self.out, self.top = enabled or bool(out), out, top

    def __enter__(self) -> "Profiler":
        if self.enabled:
            import cProfile

            self.prof = cProfile.Profile()
            self.prof.enable()
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.enabled:
            return
        import io
        import pstats

        self.prof.disable()
        if self.out:
            self.prof.dump_stats(self.out)
        for key in ("cumulative", "tottime"):
            s = io.StringIO()
            pstats.Stats(self.prof, stream=s).sort_stats(key).print_stats(self.top)
            print(s.getvalue(), file=sys.stderr)


def build_in_subprocess(kind: str, root: Path, hidden: int, layers: int, **kw: Any) -> Any:
    """Build the work in a child process, so the measuring process only loads the saved models (as
    a user's run does) and its peak RSS holds no models that were built and thrown away."""
    import subprocess

    args = json.dumps({"kind": kind, "root": str(root), "hidden": hidden, "layers": layers, **kw})
    out = subprocess.run([sys.executable, __file__, args], check=True, capture_output=True, text=True).stdout
    paths = json.loads(out.strip().splitlines()[-1])
    return {k: Path(v) for k, v in paths.items()} if kind == "ppo" else tuple(Path(v) for v in paths)


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    kind, root = spec.pop("kind"), Path(spec.pop("root"))
    if kind == "ppo":
        print(json.dumps({k: str(v) for k, v in ppo_work(root, **spec).items()}))
    else:
        print(json.dumps([str(p) for p in sft_work(root, **spec)]))
