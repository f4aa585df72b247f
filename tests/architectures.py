"""Tiny random-initialised models of real transformers architectures, each with a tokenizer set up
the way its family's real one is, and the capabilities align is expected to have on each.

`build_tiny(arch, out_dir, pad)` builds one from the architecture's real config class
(`LlamaConfig`, `Qwen2Config`, ...) at hidden 32, 2 layers, a few hundred vocabulary entries, and
saves model and tokenizer with `save_pretrained`, so align loads it exactly like a downloaded
checkpoint. The tokenizers are byte-level BPE (the `tokenizers` library, trained on a small corpus
of digits, letters and '+='), wrapped in `PreTrainedTokenizerFast` with the family's special tokens:

| family     | BOS added on encode | EOS            | pad                      | chat template          |
| ---------- | ------------------- | -------------- | ------------------------ | ---------------------- |
| llama      | <|begin_of_text|>   | <|eot_id|>     | missing (Llama-3)        | Llama-3 headers        |
| qwen2      | none                | <|im_end|>     | <|endoftext|>            | ChatML                 |
| qwen3      | none                | <|im_end|>     | <|endoftext|>            | ChatML with <think>    |
| mistral    | <s>                 | </s>           | missing                  | none (base model)      |
| gemma2     | <bos>               | <eos>          | <pad>                    | Gemma turns            |
| gpt2       | none                | <|endoftext|>  | = EOS                    | none                   |
| gpt_neox   | none                | <|endoftext|>  | = EOS (Pythia)           | none                   |
| opt        | </s> (= EOS)        | </s>           | <pad>                    | none                   |
| phi3       | none                | <|endoftext|>  | = EOS                    | Phi-3 (<|user|>, <|end|>) |

Gemma's template closes an assistant turn with `<end_of_turn>` and Phi-3's with `<|end|>`, not with
EOS (`Family.turn_end`); align's chat SFT makes that token the EOS (`align.modeling.stop_at_turn_end`).

`ARCHS[arch].expected(capability)` says, for each capability in `CAPABILITIES`, what align does
on it: `pass`, `refused` (a one-line error, its text given) or `xfail` (an align bug, described,
with the regex its failing assertion matches). tests/test_architectures.py runs every capability
of every architecture and checks the outcome against this table (xfails are strict: a fixed bug
fails the test until its entry here is updated); bench/arch_matrix.py renders the table as
docs/architectures.md, and a test checks that file is current.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HIDDEN, LAYERS, HEADS, MAX_POSITION = 32, 2, 4, 64
VOCAB_SIZE = 320
"""Byte-level BPE: 256 byte tokens, the family's specials, and merges up to this size."""

CORPUS = [
    "0123456789+-=?.: abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ\n",
    *[f"{a}+{b}={a + b}\n" for a in range(10) for b in range(10)],
    "Q: what is 3+4=? A: 7. the quick brown fox jumps over the lazy dog\n" * 4,
    "system user assistant model You are a helpful assistant.\n" * 4,
]

CAPABILITIES: dict[str, str] = {
    "sft_full": "`align sft`, full weights, `padding_free` unset; model/ reloads, logits finite and moved from the init",
    "packing": "packed batches give the padded batch's loss, and `padding_free` unset packs (or `true` is refused "
               "with a one-line error)",
    "sft_lora": "`align sft`, LoRA `target: all`, padded, chat records where the family has a template; the adapter "
                "in model/ reloads with `AutoModelForCausalLM.from_pretrained`",
    "lora_plan": "`align sft --dry-run` states the parameters and LoRA-trained parameters the run then has",
    "rm": "`align rm` from the SFT model; reloads as a one-label sequence classifier that scores a padded batch",
    "ppo_full": "`align ppo`, `memory_mode: full`, reward function, critic from the reward model; KL 0 at step 1",
    "ppo_lora": "`align ppo`, `memory_mode: lora` (reference = adapter disabled), LoRA critic; KL 0 at step 1",
    "grpo": "`align grpo` (align's RL loop, 1 step), reward function; the policy reloads",
    "chat": "chat records: the template's assistant turns are found and trained up to the token that closes them, "
            "which SFT makes the EOS that sampling stops at where it is another token",
}
"""Capability -> what the test checks (the column heading's meaning in docs/architectures.md)."""


@dataclass(frozen=True)
class Expect:
    """What align does on one capability of one architecture.

    kind: `pass`; `refused` (align stops with a one-line error containing `match`); or `xfail` (an
    align bug: the check fails with an assertion whose message matches the regex `match`; the test is
    a strict xfail, so it fails once the bug is fixed and this entry must be updated; declared as
    `Expect("xfail", reason, match)`, and none is declared today).
    """

    kind: str = "pass"
    reason: str = ""
    match: str = ""


PASS = Expect()


def refused(match: str, reason: str = "") -> Expect:
    return Expect("refused", reason or match, match)


@dataclass(frozen=True)
class Family:
    """How the real checkpoints of one family are set up."""

    model_type: str
    specials: tuple[str, ...]
    """Special tokens, in id order (they come first in the vocabulary, as in most real tokenizers)."""
    bos: str | None
    eos: str
    unk: str | None
    pad: str
    """`missing`, `eos` (pad = EOS) or `present` (the family's own pad token, `pad_token`)."""
    pad_token: str | None = None
    add_bos: bool = False
    """Whether a plain encode prepends BOS (Llama, Mistral, Gemma, OPT)."""
    chat_template: str | None = None
    turn_end: str | None = None
    """The special token the chat template closes an assistant turn with; where it is not `eos`,
    align's chat SFT makes it the EOS (`align.modeling.stop_at_turn_end`)."""
    extra_eos: tuple[str, ...] = ()
    """Further ids the real generation_config stops at (Gemma's <end_of_turn>)."""
    expect: dict[str, Expect] = field(default_factory=dict)
    """Capability -> expected outcome where it is not `pass`."""

    def expected(self, capability: str) -> Expect:
        return self.expect.get(capability, PASS)


# Chat templates, as the real checkpoints ship them (trimmed of tool-calling branches).
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
QWEN2_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen3: the last assistant turn after the last user turn carries its (here empty) reasoning block;
# with enable_thinking=false the generation prompt opens and closes an empty one.
QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}"
    "{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if message['role'] == 'user' and ns.last_query_index == messages|length - 1 %}"
    "{%- set ns.last_query_index = index %}{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- set content = message['content'] %}"
    "{%- set reasoning_content = message.get('reasoning_content', '') %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{%- endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

NO_CHAT = refused("chat records need a tokenizer with a chat template, and this one has none",
                  "no chat template (a base model): chat records stop with a one-line error")
OPT_PACKING = refused("attends across examples packed into one row, so packing would change the loss",
                      "OPT's attention ignores position ids, so packed examples would see each other: "
                      "`padding_free: true` stops with a one-line error; unset, it pads")
FAMILIES: dict[str, Family] = {
    "llama": Family("llama", ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                              "<|eot_id|>"), bos="<|begin_of_text|>", eos="<|eot_id|>", unk=None, pad="missing",
                    add_bos=True, chat_template=LLAMA3_TEMPLATE, turn_end="<|eot_id|>", expect={}),
    "qwen2": Family("qwen2", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), bos=None, eos="<|im_end|>", unk=None,
                    pad="present", pad_token="<|endoftext|>", chat_template=QWEN2_TEMPLATE, turn_end="<|im_end|>",
                    expect={}),
    "qwen3": Family("qwen3", ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"), bos=None,
                    eos="<|im_end|>", unk=None, pad="present", pad_token="<|endoftext|>", chat_template=QWEN3_TEMPLATE,
                    turn_end="<|im_end|>", expect={}),
    "mistral": Family("mistral", ("<unk>", "<s>", "</s>"), bos="<s>", eos="</s>", unk="<unk>", pad="missing",
                      add_bos=True, expect={"chat": NO_CHAT}),
    "gemma2": Family("gemma2", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"), bos="<bos>",
                     eos="<eos>", unk="<unk>", pad="present", pad_token="<pad>", add_bos=True,
                     chat_template=GEMMA_TEMPLATE, turn_end="<end_of_turn>", extra_eos=("<end_of_turn>",),
                     expect={}),
    "gpt2": Family("gpt2", ("<|endoftext|>",), bos="<|endoftext|>", eos="<|endoftext|>", unk="<|endoftext|>",
                   pad="eos", expect={"chat": NO_CHAT}),
    "gpt_neox": Family("gpt_neox", ("<|endoftext|>", "<|padding|>"), bos="<|endoftext|>", eos="<|endoftext|>",
                       unk="<|endoftext|>", pad="eos", expect={"chat": NO_CHAT}),
    "opt": Family("opt", ("<s>", "<pad>", "</s>", "<unk>"), bos="</s>", eos="</s>", unk="<unk>", pad="present",
                  pad_token="<pad>", add_bos=True, expect={"chat": NO_CHAT, "packing": OPT_PACKING}),
    "phi3": Family("phi3", ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>",
                            "<|user|>"), bos="<s>", eos="<|endoftext|>", unk="<unk>", pad="eos",
                   chat_template=PHI3_TEMPLATE, turn_end="<|end|>", expect={}),
}
ARCHS = FAMILIES
"""The architectures under test, by name (tests/test_architectures.py parametrizes over these)."""


# ----------------------------------------------------------------------------------------------
# Building


def build_tokenizer(family: Family, pad: str) -> Any:
    """A byte-level BPE tokenizer with the family's special tokens, as `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(family.specials)
    if pad == "present" and family.pad_token is None:
        specials.append("<pad>")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    kwargs: dict[str, Any] = {"eos_token": family.eos, "bos_token": family.bos, "unk_token": family.unk}
    if pad == "present":
        kwargs["pad_token"] = family.pad_token or "<pad>"
    elif pad == "eos":
        kwargs["pad_token"] = family.eos
    elif pad != "missing":
        raise ValueError(f"pad must be 'missing', 'eos' or 'present', got {pad!r}")
    extra = [s for s in specials if s not in kwargs.values()]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, add_bos_token=family.add_bos, add_eos_token=False,
                                   extra_special_tokens=extra, model_max_length=MAX_POSITION,
                                   **{k: v for k, v in kwargs.items() if v is not None})
    if family.chat_template:
        fast.chat_template = family.chat_template
    return fast


def model_config(arch: str, tokenizer: Any) -> Any:
    """The architecture's real config class at tiny sizes."""
    import transformers as T

    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    llama_like = {"hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": LAYERS,
                  "num_attention_heads": HEADS, "max_position_embeddings": MAX_POSITION}
    if arch == "llama":  # Llama-3: grouped-query attention, rope theta 500k, untied head
        return T.LlamaConfig(**ids, **llama_like, num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False)
    if arch == "qwen2":  # Qwen2-0.5B: GQA, q/k/v biases, tied embeddings
        return T.Qwen2Config(**ids, **llama_like, num_key_value_heads=2, tie_word_embeddings=True)
    if arch == "qwen3":  # Qwen3-0.6B: explicit head_dim, q/k RMSNorm, tied embeddings
        return T.Qwen3Config(**ids, **llama_like, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    if arch == "mistral":  # sliding-window attention, window shorter than the examples
        return T.MistralConfig(**ids, **llama_like, num_key_value_heads=2, sliding_window=8, tie_word_embeddings=False)
    if arch == "gemma2":  # sqrt(hidden) embedding scaling, attention and final-logit soft-capping, local/global layers
        return T.Gemma2Config(**ids, **llama_like, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                              sliding_window=8, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                              tie_word_embeddings=True)
    if arch == "gpt2":  # learned absolute positions, Conv1D projections, tied embeddings
        return T.GPT2Config(**ids, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=MAX_POSITION,
                            tie_word_embeddings=True)
    if arch == "gpt_neox":  # Pythia: partial rotary, parallel residual, untied head
        return T.GPTNeoXConfig(**ids, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=LAYERS,
                               num_attention_heads=HEADS, max_position_embeddings=MAX_POSITION, rotary_pct=0.25,
                               use_parallel_residual=True, tie_word_embeddings=False)
    if arch == "opt":  # learned positions with offset 2, ReLU, pre-LayerNorm, tied embeddings
        return T.OPTConfig(**ids, hidden_size=HIDDEN, ffn_dim=2 * HIDDEN, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, max_position_embeddings=MAX_POSITION, word_embed_proj_dim=HIDDEN,
                           do_layer_norm_before=True, tie_word_embeddings=True)
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        return T.Phi3Config(**ids, **llama_like, num_key_value_heads=HEADS, original_max_position_embeddings=MAX_POSITION,
                            tie_word_embeddings=False)
    raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(FAMILIES)}")


def build_tiny(arch: str, out_dir: Path, pad: str | None = None, seed: int = 0) -> Path:
    """Build a tiny random-initialised `arch` model and its tokenizer and save both to `out_dir`
    (`save_pretrained`). `pad`: `missing`, `eos` or `present`; None: as the family's real tokenizer."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    family = FAMILIES[arch]
    tokenizer = build_tokenizer(family, pad or family.pad)
    config = model_config(arch, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    eos = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(t) for t in family.extra_eos]
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=eos if len(eos) > 1 else eos[0])
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "arch.json").write_text(json.dumps({"arch": arch, "pad": pad or family.pad,
                                                   "parameters": sum(p.numel() for p in model.parameters())}))
    return out_dir
