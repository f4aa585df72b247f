"""The SFT stage end to end on a tiny model: learning, metrics, checkpoints that load with
`from_pretrained`, LoRA (adapter and merged), gradient-accumulation invariance, resume after a
SIGKILL, and `align generate` on the result."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from click.testing import CliRunner

from align import data as D
from align.cli import main
from align.config import SFTConfig, load_config
from align.errors import AlignError
from align.rundir import read_metrics
from align.sft import load_sft_examples, train_sft

REPO = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"samples_per_sec", "tokens_per_sec", "peak_memory_mb"}


def comparable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """metrics.jsonl rows without the wall-clock measurements."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by up to {worst:g}"


@pytest.fixture(scope="module")
def trained_run(make_sft_config: Callable[..., SFTConfig], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SFTConfig, dict]:
    """60 steps of one-digit addition: enough for the tiny model to learn the answer format."""
    out = tmp_path_factory.mktemp("sft") / "run"
    cfg = make_sft_config(out, {"train.max_steps": 60, "train.lr": 1e-2, "train.warmup_steps": 5,
                                "train.eval_every": 10, "train.log_every": 5})
    return out, cfg, train_sft(cfg)


# ----------------------------------------------------------------------------------------------
# Learning, metrics and the saved model


@pytest.mark.slow
def test_training_lowers_validation_loss(trained_run: tuple[Path, SFTConfig, dict]) -> None:
    out, _, summary = trained_run
    rows = read_metrics(out / "metrics.jsonl")
    val = [r for r in rows if "val/loss" in r]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in val] == list(range(10, 61, 10))
    assert [r["step"] for r in train] == list(range(5, 61, 5))
    assert val[-1]["val/loss"] < 0.6 * val[0]["val/loss"], [r["val/loss"] for r in val]
    assert train[-1]["train/loss"] < 0.6 * train[0]["train/loss"]
    assert summary["steps"] == 60 and summary["val/loss"] == pytest.approx(val[-1]["val/loss"])
    assert summary["best_val_loss"] == pytest.approx(min(r["val/loss"] for r in val))
    assert (out / "summary.json").is_file() and json.loads((out / "summary.json").read_text())["steps"] == 60


@pytest.mark.slow
def test_metrics_report_accuracy_perplexity_and_throughput(trained_run: tuple[Path, SFTConfig, dict]) -> None:
    out, _, _ = trained_run
    for row in read_metrics(out / "metrics.jsonl"):
        prefix = "val" if "val/loss" in row else "train"
        assert 0.0 <= row[f"{prefix}/token_accuracy"] <= 1.0
        assert row[f"{prefix}/perplexity"] == pytest.approx(math.exp(row[f"{prefix}/loss"]), rel=1e-5)
        if prefix == "train":
            for key in ("lr", "train/grad_norm", "tokens_per_sec", "samples_per_sec", "peak_memory_mb", "epoch"):
                assert isinstance(row[key], float) and row[key] >= 0, key
            assert row["tokens_per_sec"] > 0 and row["peak_memory_mb"] > 0
    lrs = [r["lr"] for r in read_metrics(out / "metrics.jsonl") if "lr" in r]
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and max(lrs) <= 1e-2  # cosine decay to min_lr_ratio 0


@pytest.mark.slow
def test_saved_model_reloads_and_its_validation_metrics_match_a_naive_loop(
        trained_run: tuple[Path, SFTConfig, dict]) -> None:
    """The final val/loss and val/token_accuracy, recomputed example by example from the saved
    model: the checkpoint is the trained model, and the metrics are token means over responses."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, cfg, summary = trained_run
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    _, val, _ = load_sft_examples(cfg, tokenizer)
    nll, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for ex in val:
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0]  # (T, V), no padding at all
            for t in range(1, len(ex.input_ids)):
                if ex.loss_mask[t]:
                    logp = torch.log_softmax(logits[t - 1], -1)
                    nll -= logp[ex.input_ids[t]].item()
                    correct += int(logits[t - 1].argmax().item() == ex.input_ids[t])
                    count += 1
    assert summary["val/loss"] == pytest.approx(nll / count, rel=1e-4)
    assert summary["val/token_accuracy"] == pytest.approx(correct / count, abs=1e-6)
    assert summary["val/perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


@pytest.mark.slow
def test_saved_model_generates_answers(trained_run: tuple[Path, SFTConfig, dict]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.generation import decode_responses, sample

    out, _, _ = trained_run
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    prompts = [tokenizer(f"Q: {p}\nA: ", add_special_tokens=False).input_ids for p in ["3+4=", "5+5=", "1+2="]]
    rollout = sample(model, tokenizer, prompts, max_new_tokens=6, greedy=True)
    assert rollout.response_ids.shape[0] == 3
    texts = decode_responses(tokenizer, rollout)
    # it learned the format: a number, then EOS
    assert rollout.has_eos.all(), texts
    assert all(re.fullmatch(r"\d+", t) for t in texts), texts


def test_run_directory_holds_the_resolved_config(trained_run: tuple[Path, SFTConfig, dict]) -> None:
    out, cfg, _ = trained_run
    assert load_config(SFTConfig, out / "config.yaml") == cfg


def test_a_finished_run_is_not_overwritten(trained_run: tuple[Path, SFTConfig, dict]) -> None:
    out, cfg, _ = trained_run
    before = (out / "summary.json").read_text()
    with pytest.raises(AlignError, match="already holds a finished run"):
        train_sft(cfg)
    assert (out / "summary.json").read_text() == before


# ----------------------------------------------------------------------------------------------
# `align generate`


def test_generate_cli_uses_the_run_template(trained_run: tuple[Path, SFTConfig, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    import align.generation

    out, _, _ = trained_run
    seen: list[str] = []
    real_sample = align.generation.sample

    def spy(model: Any, tokenizer: Any, prompts: list[list[int]], *args: Any, **kwargs: Any) -> Any:
        seen.extend(tokenizer.decode(p) for p in prompts)
        return real_sample(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(align.generation, "sample", spy)
    for path in (out, out / "model"):
        seen.clear()
        result = CliRunner().invoke(main, ["generate", str(path), "--prompt", "12+34=", "--max-new-tokens", "6"])
        assert result.exit_code == 0, result.output + (result.stderr or "")
        assert seen == ["Q: 12+34=\nA: "]
        line = result.stdout.strip()
        assert line.startswith("12+34=") and len(line) > len("12+34=")
    result = CliRunner().invoke(main, ["generate", str(out), "--prompt", "1+1=", "--prompt", "2+2=",
                                       "--template", "{prompt}", "--max-new-tokens", "4", "--temperature", "1.0"])
    assert result.exit_code == 0
    assert seen[-2:] == ["1+1=", "2+2="]
    assert "--- 1+1=" in result.stdout and "--- 2+2=" in result.stdout


# ----------------------------------------------------------------------------------------------
# LoRA


@pytest.mark.slow
def test_lora_adapter_and_merged_model_load_with_from_pretrained(
        make_sft_config: Callable[..., SFTConfig], tiny_model_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    lora = {"lora.enabled": True, "lora.r": 4, "lora.alpha": 8, "lora.target": "all", "train.max_steps": 8,
            "train.lr": 2e-2, "train.eval_every": 8}
    train_sft(make_sft_config(tmp_path / "adapter", lora))
    train_sft(make_sft_config(tmp_path / "merged", {**lora, "lora.merge": True}))

    adapter_dir, merged_dir = tmp_path / "adapter" / "model", tmp_path / "merged" / "model"
    assert (adapter_dir / "adapter_config.json").is_file() and not (adapter_dir / "model.safetensors").exists()
    targets = {t.rsplit(".", 1)[-1] for t in json.loads((adapter_dir / "adapter_config.json").read_text())["target_modules"]}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # all but lm_head
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter_config.json").exists()

    # The adapter records its base relative to itself; plain transformers resolves that against the
    # working directory (align resolves it against the adapter directory, see test_hf_interop.py).
    monkeypatch.chdir(adapter_dir)
    with_adapter = AutoModelForCausalLM.from_pretrained(adapter_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = torch.tensor([[20, 11, 21, 29, 22, 2]])
    with torch.no_grad():
        a, m, b = (x(input_ids=ids).logits for x in (with_adapter, merged, base))
    assert (a - b).abs().max() > 1e-3, "the adapter changed nothing"
    assert torch.allclose(a, m, atol=1e-4), "merging changed the model"


# ----------------------------------------------------------------------------------------------
# Gradient accumulation (TRL's invariant: 8 x 1 step == 4 x 2 == 2 x 4)


@pytest.mark.slow
def test_gradient_accumulation_gives_the_same_training(
        make_sft_config: Callable[..., SFTConfig], tiny_model_dir: Path, tmp_path: Path,
        load_weights: Callable[[Path], dict[str, torch.Tensor]]) -> None:
    runs = {}
    for batch, accum in [(8, 1), (4, 2), (2, 4)]:
        out = tmp_path / f"b{batch}x{accum}"
        train_sft(make_sft_config(out, {"train.batch_size": batch, "train.grad_accum": accum, "train.max_steps": 6,
                                        "train.eval_every": 3, "train.log_every": 1}))
        runs[(batch, accum)] = (load_weights(out / "model"), comparable(read_metrics(out / "metrics.jsonl")))
    ref_weights, ref_rows = runs[(8, 1)]
    init = load_weights(tiny_model_dir)
    assert max((ref_weights[k] - init[k]).abs().max().item() for k in init) > 1e-2, "training changed nothing"
    for key in [(4, 2), (2, 4)]:
        weights, rows = runs[key]
        assert_same_weights(weights, ref_weights, atol=2e-5)
        assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
        for got, want in zip(rows, ref_rows):
            for metric in ("train/loss", "train/token_accuracy", "train/grad_norm", "val/loss", "val/token_accuracy",
                       "lr"):
                if metric in want:
                    assert got[metric] == pytest.approx(want[metric], rel=1e-5, abs=1e-6), (key, got["step"], metric)


def test_one_global_batch_sees_the_same_examples_whatever_the_split(make_sft_config: Callable[..., SFTConfig],
                                                                   tokenizer: Any, tmp_path: Path) -> None:
    # the order depends on the global batch only, so 8x1 and 4x2 train on identical examples
    cfg = make_sft_config(tmp_path / "r")
    train, _, _ = load_sft_examples(cfg, tokenizer)
    assert next(D.global_batches(len(train), 8, cfg.seed))[2] == next(D.global_batches(len(train), 4 * 2, cfg.seed))[2]


# ----------------------------------------------------------------------------------------------
# Resume after a kill


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(
        make_sft_config: Callable[..., SFTConfig], make_sft_dict: Callable[..., dict], tmp_path: Path,
        align_cli: Callable[..., Any], yaml_writer: Callable[[Path, dict], Path],
        load_weights: Callable[[Path], dict[str, torch.Tensor]]) -> None:
    settings = {"train.max_steps": 20, "train.save_every": 5, "train.keep_checkpoints": 2, "train.log_every": 1,
                "train.eval_every": 4}
    reference = tmp_path / "reference"
    train_sft(make_sft_config(reference, settings))

    # A run killed (SIGKILL) right after logging step 13: its newest checkpoint is step 10.
    run = tmp_path / "interrupted"
    config = yaml_writer(tmp_path / "sft.yaml", make_sft_dict(run, settings))
    killed = align_cli("13", "sft", str(config), module_args=[str(REPO / "tests" / "kill_after_step.py")])
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000010"
    assert not (run / "model").exists() and not (run / "summary.json").exists()
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == 13

    # Without --resume the interrupted run is refused; with it, it continues from step 10.
    refused = CliRunner().invoke(main, ["sft", str(config)])
    assert refused.exit_code == 2 and "--resume" in refused.stderr
    resumed = CliRunner().invoke(main, ["sft", str(config), "--resume"])
    assert resumed.exit_code == 0, resumed.output + (resumed.stderr or "")
    assert "resumed from" in resumed.stdout and "step 10" in resumed.stdout

    # Same metrics at every step (no row of the killed process left over), same final weights.
    assert comparable(read_metrics(run / "metrics.jsonl")) == comparable(read_metrics(reference / "metrics.jsonl"))
    assert_same_weights(load_weights(run / "model"), load_weights(reference / "model"), atol=1e-6)
    assert json.loads((run / "summary.json").read_text())["steps"] == 20


def test_resume_before_any_checkpoint_starts_over(make_sft_config: Callable[..., SFTConfig], tmp_path: Path) -> None:
    # a run killed before its first checkpoint left metrics rows behind; --resume starts it over
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 3, "train/loss": 99.0}) + "\n", encoding="utf-8")
    train_sft(make_sft_config(out, {"train.max_steps": 4, "train.eval_every": 4}), resume=True)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    assert all(r.get("train/loss") != 99.0 for r in rows)
