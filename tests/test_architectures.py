"""Every architecture of tests/architectures.py through align, each capability checked against the
outcome declared there (`ARCHS[arch].expected(capability)`): `pass`, `refused` with a one-line
error, or a strict xfail naming an align bug. docs/architectures.md renders the same table
(bench/arch_matrix.py) and `test_architecture_table_is_current` keeps it so.

Runs. Two `align run` recipes per architecture, on tiny models with a handful of steps:

    A: sft (full, padding_free unset) -> rm (from that SFT) -> ppo (full, critic from the RM) -> grpo
    B: sft (LoRA, padded; chat records where the family has a template) -> ppo (lora, from A's SFT)

Every recipe goes through `align.cli.main`, the `python -m align` entry point, but all of them in
one subprocess (tests/arch_runner.py; `align run` itself chains stages in one process): a fresh
interpreter per command costs some 5 s of CPU in imports, 18 of them would take most of this
module's budget. Where packing is refused, `python -m align sft` runs in a process of its own and
must stop with the one-line error and exit 2. LoRA with packing and full weights with padding are
not separate SFT stages: what depends on the architecture there (packed and padded batches giving
the same loss, for full and peft-wrapped models alike; the reward model and PPO run padded) is
checked on the model in-process. The capabilities that need no training (`lora_plan`, `chat`,
`trl_prompts`) run in-process too. Every saved model/ is loaded back with
`AutoModelForCausalLM` / `AutoModelForSequenceClassification`.

Set ALIGN_ARCH_OBSERVED=path.json to record what each check observed;
`python bench/arch_matrix.py --observed path.json` renders that instead of the declared table.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml

from architectures import ARCHS, CAPABILITIES, Expect, build_tiny

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
TEMPLATE = "Q: {prompt}\nA: "
REWARD = "toy_rewards:fraction_of_sevens"
TRAIN = {"batch_size": 8, "lr": 1.0e-2, "eval_every": 1000, "log_every": 1, "save_every": 1000, "mixed_precision": "no"}
PPO_LOOP = {"total_episodes": 16, "rollout_batch_size": 8, "mini_batch_size": 8, "micro_batch_size": 8, "ppo_epochs": 1,
            "response_length": 4, "temperature": 1.0, "lr": 1.0e-3, "mixed_precision": "no", "eval_every": 1000,
            "sample_every": 1000, "save_every": 1000}
RL_LOOP = {"total_episodes": 8, "rollout_batch_size": 8, "n_samples_per_prompt": 4, "mini_batch_size": 8,
           "micro_batch_size": 8, "ppo_epochs": 1, "response_length": 4, "temperature": 1.0, "lr": 1.0e-3,
           "mixed_precision": "no", "save_every": 1000, "eval_every": 1000, "sample_every": 1000}
LORA = {"enabled": True, "r": 4, "alpha": 8, "target": "all"}
OBSERVED: dict[str, dict[str, str]] = {}


class UnexpectedFailure(Exception):
    """A check expected to fail with a known bug's symptom failed otherwise (so it is no xfail)."""


# ----------------------------------------------------------------------------------------------
# Data and runs


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def task_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One-digit addition (align.tasks.addition), and its SFT splits as chat records too."""
    from align.tasks.addition import build

    root = tmp_path_factory.mktemp("arch-data")
    files = build(root, seed=0, n_digits=1, n_sft=48, n_pref=32, n_prompts=16, n_eval=4)
    for split in ("sft_train", "sft_val"):
        rows = [json.loads(line) for line in files[split].read_text().splitlines()]
        files[f"{split}_chat"] = write_jsonl(root / f"{split}_chat.jsonl", [
            {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
            for r in rows])
    files["chat_prompts"] = write_jsonl(root / "chat_prompts.jsonl",
                                        [{"messages": [{"role": "user", "content": "3+4="}]}])
    return files


RUN_CAPABILITIES = {"sft_full", "packing", "sft_lora", "rm", "ppo_full", "ppo_lora", "grpo"}
"""The capabilities read from the recipe runs (the others run in-process on the built model)."""


@dataclass
class Recipe:
    """One `align run RECIPE` of tests/arch_runner.py: its output root and what the command left."""

    name: str
    root: Path
    logs: Path

    @cached_property
    def result(self) -> dict[str, Any]:
        path = self.logs / "result.json"
        return json.loads(path.read_text()) if path.is_file() else {"exit": None}

    @property
    def stdout(self) -> str:
        return (self.logs / "stdout.txt").read_text(encoding="utf-8") if (self.logs / "stdout.txt").is_file() else ""

    @property
    def stderr(self) -> str:
        return (self.logs / "stderr.txt").read_text(encoding="utf-8") if (self.logs / "stderr.txt").is_file() else ""

    def stage(self, stage: str) -> Path:
        """The stage's run directory; fails the test (naming the recipe's error) if it did not complete."""
        from align.runtime import RunDir

        out = self.root / stage
        if not RunDir(out).is_complete():
            tail = "\n".join(self.stderr.strip().splitlines()[-15:])
            pytest.fail(f"recipe {self.name}: stage {stage} did not complete (exit {self.result['exit']}):\n{tail}",
                        pytrace=False)
        return out


class Arch:
    """One architecture: its tiny model, its two recipes (run by `Matrix.run`) and the refusal run."""

    def __init__(self, arch: str, root: Path, data: dict[str, Path], matrix: "Matrix"):
        self.arch, self.root, self.data, self.matrix = arch, root, data, matrix
        self.family = ARCHS[arch]
        self.model = build_tiny(arch, root / "init", self.family.pad)
        self.recipes = {"A": Recipe(f"{arch}/A", root / "A", root / "logs" / "A"),
                        "B": Recipe(f"{arch}/B", root / "B", root / "logs" / "B")}

    @property
    def a(self) -> Recipe:
        self.matrix.run()
        return self.recipes["A"]

    @property
    def b(self) -> Recipe:
        self.matrix.run()
        return self.recipes["B"]

    def sft_section(self, **extra: Any) -> dict[str, Any]:
        d = self.data
        return {"model": {"path": str(self.model)},
                "data": {"train": str(d["sft_train"]), "validation": str(d["sft_val"]), "max_length": 24},
                "train": {**TRAIN, "max_steps": 4}, **extra}

    def recipe_a(self) -> dict[str, Any]:
        d, root = self.data, self.recipes["A"].root
        return {
            "output_root": str(root), "seed": 0, "prompt_template": TEMPLATE,
            "sft": self.sft_section(),
            "rm": {"data": {"train": str(d["pref_train"]), "validation": str(d["pref_val"]), "max_length": 24},
                   "train": {**TRAIN, "max_steps": 2}},
            "ppo": {"reward": {"function": REWARD}, "critic": {"path": str(root / "rm")},
                    "data": {"train": str(d["prompts"]), "max_length": 16}, "ppo": PPO_LOOP},
            "grpo": {"reward": {"function": REWARD}, "data": {"train": str(d["prompts"]), "max_length": 16},
                     "ppo": RL_LOOP},
        }

    def recipe_b(self) -> dict[str, Any]:
        d = self.data
        sft = self.sft_section(lora=LORA)
        sft["train"]["padding_free"] = False
        if self.family.chat_template is not None:  # the templates (Qwen's system prompt most) make longer rows
            sft["data"] = {"train": str(d["sft_train_chat"]), "validation": str(d["sft_val_chat"]), "max_length": 64}
        return {
            "output_root": str(self.recipes["B"].root), "seed": 0, "prompt_template": TEMPLATE, "sft": sft,
            "ppo": {"model": {"path": str(self.recipes["A"].root / "sft")}, "memory_mode": "lora",  # A's SFT model
                    "lora": {"r": 4, "alpha": 8}, "critic": {"lora": True}, "reward": {"function": REWARD},
                    "data": {"train": str(d["prompts"]), "max_length": 16}, "ppo": PPO_LOOP},
        }

    @cached_property
    def packing_refusal(self) -> subprocess.CompletedProcess:
        """`python -m align sft --set train.padding_free=true`: the run the architecture must refuse,
        in a process of its own, so exit code and stderr are exactly the command's."""
        cfg = {"output_dir": str(self.root / "packed"), "seed": 0, **self.sft_section()}
        cfg["data"]["prompt_template"] = TEMPLATE
        path = self.root / "packed.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        return self.matrix.run_align("sft", str(path), "--set", "train.padding_free=true", cwd=TESTS)

    @cached_property
    def tokenizer(self) -> Any:
        from align.modeling import load_tokenizer

        return load_tokenizer(str(self.model))

    @cached_property
    def probe_ids(self) -> torch.Tensor:
        """One row of real tokens (no padding) in the base vocabulary."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.model)
        return torch.tensor([tok("Q: 3+4=\nA: 7", add_special_tokens=False).input_ids])

    @cached_property
    def init_logits(self) -> torch.Tensor:
        return causal_logits(self.model, self.probe_ids)


class Matrix:
    """The architectures under test. `run()` runs every selected architecture's recipes A then B
    in one tests/arch_runner.py subprocess (once per module)."""

    def __init__(self, root: Path, data: dict[str, Path], run_align: Callable[..., Any], selected: list[str]):
        self.root, self.data, self.run_align, self.selected = root, data, run_align, selected
        self.archs: dict[str, Arch] = {}
        self.proc: subprocess.CompletedProcess | None = None

    def get(self, arch: str) -> Arch:
        if arch not in self.archs:
            self.archs[arch] = Arch(arch, self.root / arch, self.data, self)
        return self.archs[arch]

    def run(self) -> None:
        if self.proc is not None:
            return
        jobs = []
        for name in ("A", "B"):  # every A first: B's PPO starts from A's SFT model
            for arch in self.selected:
                ctx = self.get(arch)
                recipe = ctx.recipe_a() if name == "A" else ctx.recipe_b()
                path = ctx.root / f"{name}.yaml"
                path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
                jobs.append({"name": f"{arch}/{name}", "argv": ["run", str(path)], "out": str(ctx.recipes[name].logs)})
        (self.root / "jobs.json").write_text(json.dumps(jobs, indent=1))
        t0 = time.time()
        self.proc = self.run_align(str(self.root / "jobs.json"), cwd=TESTS, module_args=[str(TESTS / "arch_runner.py")],
                                   timeout=900)
        self.wall = time.time() - t0
        assert self.proc.returncode == 0, f"tests/arch_runner.py failed:\n{self.proc.stderr[-3000:]}"


def causal_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of `AutoModelForCausalLM.from_pretrained(model_dir)` on `ids`, checked finite."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    except (RuntimeError, OSError, ValueError) as e:
        raise AssertionError(f"AutoModelForCausalLM.from_pretrained({model_dir.name}/) failed: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all(), f"{model_dir}: non-finite logits"
    return logits


def assert_moved(logits: torch.Tensor, init: torch.Tensor, what: str) -> None:
    vocab = init.shape[-1]  # the trained model may have gained a pad row
    assert (logits[..., :vocab] - init).abs().max() > 1e-4, f"{what}: logits equal the initial model's"


def finite_metrics(run_dir: Path) -> list[dict[str, Any]]:
    from align.runtime import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows, f"{run_dir}: no metrics"
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float):
                assert math.isfinite(value), f"{run_dir.name}: {key} = {value} at step {row.get('step')}"
    return rows


def assert_one_line_error(proc: subprocess.CompletedProcess, text: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert proc.returncode == 2, f"exit {proc.returncode}, expected 2 (a user error):\n{proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(errors) == 1 and text in errors[0], f"expected one 'error: ...{text}...' line, got:\n{proc.stderr[-2000:]}"


@pytest.fixture(scope="module")
def matrix(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, task_data: dict[str, Path],
           align_cli: Callable[..., Any]) -> Matrix:
    """Runs the recipes only of the architectures whose recipe-reading tests were selected."""
    selected = {item.callspec.params["arch"] for item in request.session.items
                if hasattr(item, "callspec") and item.callspec.params.get("capability") in RUN_CAPABILITIES}
    if any(item.name == "test_ppo_starts_from_a_lora_sft_run" for item in request.session.items):
        selected.add("llama")
    m = Matrix(tmp_path_factory.mktemp("archs"), task_data, align_cli, [a for a in ARCHS if a in selected])
    yield m
    if os.environ.get("ALIGN_ARCH_OBSERVED"):
        Path(os.environ["ALIGN_ARCH_OBSERVED"]).write_text(json.dumps(OBSERVED, indent=1, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------
# The checks: one per capability. Each asserts what `pass` means; `refused` ones assert the
# one-line error instead.


def check_sft_full(ctx: Arch, expect: Expect) -> None:
    from transformers import AutoTokenizer

    run = ctx.a.stage("sft")
    rows = finite_metrics(run)
    assert any("train/loss" in r for r in rows) and any("val/loss" in r for r in rows)
    assert_moved(causal_logits(run / "model", ctx.probe_ids), ctx.init_logits, "SFT model")
    tok = AutoTokenizer.from_pretrained(run / "model")
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id, "the saved tokenizer pads with EOS"


def check_packing(ctx: Arch, expect: Expect) -> None:
    """Packed vs padded loss on examples of varied length (longer than the sliding windows), for the
    full model and a peft-wrapped one; then what `padding_free` unset chose in recipe A's SFT."""
    from transformers import AutoModelForCausalLM

    from align import data as D
    from align.config import LoraConfig, ModelConfig
    from align.modeling import apply_lora, load_pretrained, packs_exactly
    from align.sft import sft_terms

    tok = ctx.tokenizer
    records = [D.Record(f"x:{i}", {"prompt": "+".join(str(j) for j in range(k)) + "=", "response": str(7 * k)})
               for i, k in enumerate([1, 3, 5, 8, 12, 2, 6])]
    examples, _ = D.tokenize_sft(records, "prompt_response", TEMPLATE, tok, 64, "drop")
    packed_batch = D.pack_examples(examples, tok.pad_token_id)
    assert packed_batch["input_ids"].shape[0] < len(examples), "nothing was packed"
    model = load_pretrained(AutoModelForCausalLM, ModelConfig(path=str(ctx.model)), tok, trainable=False)
    lora = apply_lora(load_pretrained(AutoModelForCausalLM, ModelConfig(path=str(ctx.model)), tok, trainable=True),
                      LoraConfig(**{**LORA, "target": "all"}))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        gaps = []
        for m in (model, lora):
            packed, n_packed, _ = sft_terms(m, packed_batch)
            padded, n_padded, _ = sft_terms(m, D.pad_examples(examples, tok.pad_token_id))
            assert n_packed == n_padded
            gaps.append(abs(packed.item() - padded.item()) / padded.item())
    log = ctx.a.stdout
    if expect.kind == "refused":  # align's own probe says so, and the losses differ (fp32 noise is ~1e-7)
        assert not packs_exactly(model) and min(gaps) > 1e-6, f"packing is refused, yet packed and padded agree ({gaps})"
        assert "batches: padded (this model attends across packed examples)" in log, log[-2000:]
        assert_one_line_error(ctx.packing_refusal, expect.match)
        assert not (ctx.root / "packed" / "model").exists()
    else:
        assert max(gaps) < 1e-5, f"packed and padded losses differ by {gaps} (relative; full, LoRA)"
        assert "batches: packed (padding-free)" in log, log[-2000:]


def check_sft_lora(ctx: Arch, expect: Expect) -> None:
    run = ctx.b.stage("sft")
    finite_metrics(run)
    model = run / "model"
    assert (model / "adapter_config.json").is_file() and not (model / "model.safetensors").exists()
    log = ctx.b.stdout
    assert "batches: padded" in log and ("format chat" in log) == (ctx.family.chat_template is not None), log[-2000:]
    assert_moved(causal_logits(model, ctx.probe_ids), ctx.init_logits, "LoRA SFT model")
    if ctx.family.chat_template is not None:  # the adapter's tokenizer stops where the chat turns were trained to end
        from transformers import AutoTokenizer

        assert AutoTokenizer.from_pretrained(model).eos_token == ctx.family.turn_end
        assert (f"EOS is now {ctx.family.turn_end!r}" in log) == (ctx.family.turn_end != ctx.family.eos), log[-2000:]


def check_lora_plan(ctx: Arch, expect: Expect) -> None:
    """`align sft --dry-run` (in-process, through the CLI) against the model the run then trains."""
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from align.cli import main
    from align.config import LoraConfig, ModelConfig
    from align.modeling import apply_lora, load_pretrained

    cfg = {"output_dir": str(ctx.root / "plan"), "seed": 0, "lora": LORA, **ctx.sft_section()}
    path = ctx.root / "plan.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    result = CliRunner().invoke(main, ["sft", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    said = {k: int(v.replace(",", "")) for k, v in re.findall(r"^\s*(parameters|trained parameters): ([\d,]+)",
                                                               result.stdout, re.M)}
    checkpoint = json.loads((ctx.model / "arch.json").read_text())["parameters"]  # unique parameters, as saved
    model = apply_lora(load_pretrained(AutoModelForCausalLM, ModelConfig(path=str(ctx.model)), ctx.tokenizer,
                                       trainable=True), LoraConfig(**LORA))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    wrong = []
    if said["parameters"] != checkpoint:
        wrong.append(f"plan says {said['parameters']} parameters; the checkpoint has {checkpoint}")
    if said["trained parameters"] != trained:
        wrong.append(f"plan says {said['trained parameters']} trained parameters; peft's adapter has {trained}")
    assert not wrong, "; ".join(wrong)


def check_rm(ctx: Arch, expect: Expect) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = ctx.a.stage("rm")
    rows = finite_metrics(run)
    assert any("val/accuracy" in r for r in rows)
    rm = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
    tok = AutoTokenizer.from_pretrained(run / "model")
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    batch = tok(["Q: 3+4=\nA: 7", "Q: 5+5=\nA: 10 and more"], padding=True, return_tensors="pt")
    assert not batch["attention_mask"].all(), "the probe batch should need padding"
    with torch.no_grad():
        scores = rm(**batch).logits
        alone = rm(**tok(["Q: 3+4=\nA: 7"], return_tensors="pt")).logits
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()
    torch.testing.assert_close(scores[:1], alone, rtol=1e-4, atol=1e-5)  # read at the last real token


def check_ppo(recipe: str) -> Callable[[Arch, Expect], None]:
    def check(ctx: Arch, expect: Expect) -> None:
        run = getattr(ctx, recipe).stage("ppo")
        rows = finite_metrics(run)
        assert [r["step"] for r in rows if "objective/kl" in r] == [1, 2]
        first = next(r for r in rows if "objective/kl" in r)
        assert abs(first["objective/kl"]) < 1e-5 and first["val/ratio"] == pytest.approx(1.0, abs=1e-5), first
        causal_logits(run / "model", ctx.probe_ids)

    return check


def check_grpo(ctx: Arch, expect: Expect) -> None:
    run = ctx.a.stage("grpo")
    rows = finite_metrics(run)
    assert rows[-1]["episode"] == RL_LOOP["total_episodes"] and "objective/scores" in rows[-1]
    causal_logits(run / "model", ctx.probe_ids)


def check_chat(ctx: Arch, expect: Expect) -> None:
    """What `align sft` does with chat records (`load_sft_examples`): make the template's turn end
    EOS where it is another token (`stop_at_turn_end`), then tokenize; the trained tokens must end
    the reply with that EOS, the one sampling stops at."""
    from align import data as D
    from align.errors import AlignError
    from align.generation import sampling_config
    from align.modeling import load_tokenizer, stop_at_turn_end

    tok = load_tokenizer(str(ctx.model))  # a fresh one: stop_at_turn_end changes it
    eos = tok.eos_token
    said = stop_at_turn_end(tok)
    assert D.turn_end_token(tok) == ctx.family.turn_end, (
        f"the template's turn end is {D.turn_end_token(tok)!r}, declared {ctx.family.turn_end!r}")
    messages = [{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "7"}]
    record = D.Record("chat.jsonl:1", {"messages": messages})
    if expect.kind == "refused":
        assert said is None and tok.eos_token == eos
        with pytest.raises(AlignError) as info:
            D.tokenize_sft([record], "chat", TEMPLATE, tok, 64, "drop")
        assert expect.match in str(info.value) and "\n" not in str(info.value)
        return
    assert tok.eos_token == ctx.family.turn_end and (said is None) == (eos == ctx.family.turn_end), (eos, said)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    (example,), _ = D.tokenize_sft([record], "chat", TEMPLATE, tok, 64, "drop")
    trained = [t for t, m in zip(example.input_ids, example.loss_mask) if m]
    prompt = D.prompt_text(D.Record("p:1", {"messages": messages[:1]}), "chat", TEMPLATE, tok)
    whole = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(example.input_ids) == whole and whole.startswith(prompt)
    assert tok.decode(trained).lstrip().startswith("7") or "</think>" in tok.decode(trained), tok.decode(trained)
    assert tok.eos_token_id in trained, (f"EOS {tok.eos_token!r} is not among the trained tokens "
                                         f"{tok.decode(trained)!r}: a chat-trained model never learns to stop")
    after = tok.decode(trained).split("7", 1)[1]
    assert after.lstrip().startswith(tok.eos_token), f"the reply is closed by {after!r}, not EOS {tok.eos_token!r}"
    assert sampling_config(tok, 4).eos_token_id == tok.eos_token_id


CHECKS: dict[str, Callable[[Arch, Expect], None]] = {
    "sft_full": check_sft_full, "packing": check_packing, "sft_lora": check_sft_lora, "lora_plan": check_lora_plan,
    "rm": check_rm, "ppo_full": check_ppo("a"), "ppo_lora": check_ppo("b"), "grpo": check_grpo, "chat": check_chat,
}


def cases() -> list[Any]:
    out = []
    for arch, family in ARCHS.items():
        for capability in CAPABILITIES:
            expect = family.expected(capability)
            marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=expect.reason)] \
                if expect.kind == "xfail" else []
            out.append(pytest.param(arch, capability, id=f"{arch}-{capability}", marks=marks))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch,capability", cases())
def test_capability(arch: str, capability: str, matrix: Matrix) -> None:
    expect = ARCHS[arch].expected(capability)
    OBSERVED.setdefault(arch, {})[capability] = "error"
    try:
        CHECKS[capability](matrix.get(arch), expect)
    except AssertionError as e:
        if expect.kind == "xfail" and re.search(expect.match, str(e)):
            OBSERVED[arch][capability] = "xfail"
            raise
        OBSERVED[arch][capability] = f"failed: {str(e).splitlines()[0] if str(e) else 'AssertionError'}"
        if expect.kind == "xfail":
            raise UnexpectedFailure(f"expected the known bug (/{expect.match}/), got: {e}") from e
        raise
    OBSERVED[arch][capability] = expect.kind if expect.kind == "refused" else "pass"


def test_every_capability_has_a_check() -> None:
    assert set(CHECKS) == set(CAPABILITIES)
    for family in ARCHS.values():
        assert set(family.expect) <= set(CAPABILITIES)
        for e in family.expect.values():
            assert e.kind in ("refused", "xfail") and e.reason and e.match


def test_architecture_table_is_current() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("arch_matrix", REPO / "bench" / "arch_matrix.py")
    matrix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(matrix)
    doc = REPO / "docs" / "architectures.md"
    assert doc.is_file() and doc.read_text(encoding="utf-8") == matrix.render(), (
        "docs/architectures.md is out of date with tests/architectures.py; run `python bench/arch_matrix.py`")



@pytest.mark.slow
def test_ppo_starts_from_a_lora_sft_run(matrix: Matrix) -> None:
    """SFT with LoRA then PPO from that run: the usual LoRA workflow (recipe B's PPO starts from A's
    full SFT instead, so that `ppo_lora` is tested on every architecture)."""
    from click.testing import CliRunner

    from align.cli import main

    ctx = matrix.get("llama")
    sft = ctx.b.stage("sft")
    cfg = {"output_dir": str(ctx.root / "ppo-from-lora"), "seed": 0, "model": {"path": str(sft)},
           "memory_mode": "lora", "lora": {"r": 4, "alpha": 8}, "reward": {"function": REWARD},
           "data": {"train": str(ctx.data["prompts"]), "prompt_template": TEMPLATE, "max_length": 16},
           "ppo": {**PPO_LOOP, "total_episodes": 8}}
    path = ctx.root / "ppo-from-lora.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    result = CliRunner().invoke(main, ["ppo", str(path)])
    error = result.exception if not isinstance(result.exception, SystemExit) else None
    assert result.exit_code == 0 and error is None, (
        f"align ppo from the LoRA SFT run: exit {result.exit_code}, "
        f"{type(error).__name__ + ': ' + str(error).splitlines()[0] if error else result.output[-500:]}")
