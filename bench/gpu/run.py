"""align on one GPU (H100/H200 class), offline: correctness checks that need a GPU, then SFT
throughput and MFU on a 0.5B Qwen2-shaped model, then PPO and GRPO episodes/s and peak memory in
both memory modes. Everything is random-initialised in memory and saved under a scratch
directory: no network, no hub. One JSON of results.

    python bench/gpu/run.py --out gpu.json                  # the GPU run (< 8 minutes on an H100/H200)
    python bench/gpu/run.py --smoke --out /tmp/gpu.json     # the same code paths on CPU, tiny models (< 60 s)

Needs only torch, transformers, peft, trl, accelerate (and what they pull in) plus this
repository on PYTHONPATH (align's Python entry points are called; its CLI is not). See README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

PEAK_BF16_FLOPS = {  # dense bf16 tensor-core peak, FLOP/s; matched against torch.cuda.get_device_name()
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,  # how an H100 SXM names itself
    "A100": 312e12,
}
REWARD = "align.tasks.addition:gold_reward"
"""Any importable reward works; this one is cheap and never fails (0.0 for an unparsable answer)."""
TEMPLATE = "You are a careful calculator. Add the two numbers and answer with digits only.\nQ: {prompt}\nA: "

# name -> Qwen2Config sizes. `sft` is Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads,
# intermediate 4864, vocab 151936, tied embeddings); `rl` a smaller one with the same vocabulary.
SIZES = {
    "gpu": {
        "check": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=1024, vocab_size=32000),
        "sft": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                    intermediate_size=4864, vocab_size=151936),
        "rl": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                   intermediate_size=1408, vocab_size=151936),
    },
    "smoke": {
        "check": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=512),
        "sft": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, vocab_size=512),
        "rl": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=512),
    },
}
WORK = {  # run lengths
    "gpu": {"sft_seq": 1024, "sft_batch": 8, "sft_steps": 30, "sft_log_every": 5,
            "ppo": {"total_episodes": 256, "rollout_batch_size": 64, "mini_batch_size": 32, "micro_batch_size": 16,
                    "ppo_epochs": 2, "response_length": 64},
            "grpo": {"total_episodes": 256, "rollout_batch_size": 64, "n_samples_per_prompt": 8, "mini_batch_size": 64,
                     "micro_batch_size": 16, "ppo_epochs": 1, "response_length": 64}},
    "smoke": {"sft_seq": 64, "sft_batch": 4, "sft_steps": 4, "sft_log_every": 2,
              "ppo": {"total_episodes": 8, "rollout_batch_size": 4, "mini_batch_size": 4, "micro_batch_size": 4,
                      "ppo_epochs": 1, "response_length": 4},
              "grpo": {"total_episodes": 4, "rollout_batch_size": 4, "n_samples_per_prompt": 2, "mini_batch_size": 4,
                       "micro_batch_size": 4, "ppo_epochs": 1, "response_length": 4}},
}
RESULT_KEYS = ("meta", "checks", "sft", "ppo", "grpo", "errors", "seconds")
"""Top-level keys of the JSON (tests/test_gpu_bench_smoke.py checks them)."""


# ----------------------------------------------------------------------------------------------
# Models, data, measurement


def quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tokenizer() -> Any:
    """align's byte-level tokenizer: 256 bytes + [PAD] [BOS] [EOS] [UNK], one token per character."""
    from align.modeling import train_byte_tokenizer

    return train_byte_tokenizer(["0123456789+-=?.: abcdefghijklmnopqrstuvwxyz\n"])


def build_model(out: Path, sizes: dict[str, int], device: torch.device, seed: int = 0,
                max_position: int = 2048) -> tuple[Path, int]:
    """A random-initialised Qwen2ForCausalLM (tied embeddings, like Qwen2-0.5B), built on `device`
    (fast init on a GPU) and saved in bfloat16 with the tokenizer. Returns (dir, parameters)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = tokenizer()
    config = Qwen2Config(**sizes, max_position_embeddings=max_position, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16 if device.type == "cuda" else torch.float32).save_pretrained(out)
    tok.save_pretrained(out)
    del model
    free()
    return out, n


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def memory_plan(stage: str, cfg: Any, device: torch.device, measured_mb: float | None) -> dict[str, Any]:
    """align's memory plan (align/memplan.py) for the run, beside the measured allocator peak."""
    from align.memplan import model_facts, stage_plan

    plan = stage_plan(stage, cfg, model_facts(stage, cfg), device="cuda" if device.type == "cuda" else "cpu")
    planned = plan.peak_bytes / 2**20
    return {"memory_plan_mb": planned, "memory_plan_phase": plan.peak_phase.name,
            "memory_plan_over_measured": planned / measured_mb if measured_mb else None}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sft_records(n: int, seq: int, seed: int = 0) -> list[dict[str, str]]:
    """Records of exactly `seq` tokens with the byte tokenizer (prompt + response + EOS), so every
    batch is B x seq with no padding: tokens/s is then the model's throughput, not the data's."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 "
    prompt_len = min(64, seq // 4)
    return [{"prompt": "".join(rng.choice(alphabet) for _ in range(prompt_len)),
             "response": "".join(rng.choice(alphabet) for _ in range(seq - prompt_len - 1))} for _ in range(n)]


def prompt_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"prompt": f"{rng.randint(0, 99)}+{rng.randint(0, 99)}="} for _ in range(n)]


def steady_rate(rows: list[dict[str, Any]], key: str) -> float | None:
    """Mean of `key` over the logged rows after the first (which carries warm-up)."""
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    values = values[1:] if len(values) > 1 else values
    return sum(values) / len(values) if values else None


def peak_flops_for_name(name: str) -> tuple[float | None, str]:
    """The table's peak for a `torch.cuda.get_device_name()`; H100 PCIe/NVL (lower clocks) are not in it."""
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name and "PCIe" not in name and "NVL" not in name:
            return flops, f"table: {key}"
    return None, f"unknown for '{name}'; pass --peak-flops"


def peak_flops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-flops"
    if device.type != "cuda":
        return None, "unknown (CPU; pass --peak-flops)"
    return peak_flops_for_name(torch.cuda.get_device_name(device))


@contextlib.contextmanager
def captured_stdout() -> Any:
    """The stages print progress and a report line; keep them out of the bench's own output."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield buf


# ----------------------------------------------------------------------------------------------
# GPU-only checks


def check_bf16_autocast(device: torch.device, model_dir: Path) -> dict[str, Any]:
    """The SFT loss and logits of the same weights in float32 and under bf16 autocast (what
    `mixed_precision: bf16` runs): equal within bf16's precision."""
    from transformers import AutoModelForCausalLM

    from align import data as D
    from align.config import ModelConfig
    from align.modeling import load_pretrained, load_tokenizer
    from align.sft import sft_terms

    tok = load_tokenizer(str(model_dir))
    model = load_pretrained(AutoModelForCausalLM, ModelConfig(path=str(model_dir)), tok, trainable=True, device=device)
    model.eval()
    records = [D.Record(f"r:{i}", r) for i, r in enumerate(sft_records(8, 128, seed=1))]
    examples, _ = D.tokenize_sft(records, "prompt_response", "{prompt}", tok, 512, "drop")
    batch = {k: v.to(device) for k, v in D.pad_examples(examples, tok.pad_token_id).items()}
    with torch.no_grad():
        nll32, n, _ = sft_terms(model, batch)
        logits32 = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            nll16, _, _ = sft_terms(model, batch)
            raw16 = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits16 = raw16.float()
    loss32, loss16 = (nll32 / n).item(), (nll16 / n).item()
    rel_loss = abs(loss16 - loss32) / abs(loss32)
    logit_err = ((logits16 - logits32).abs().max() / logits32.abs().max()).item()
    tol_loss, tol_logits = 1e-2, 5e-2
    return {"ok": rel_loss < tol_loss and logit_err < tol_logits, "loss_fp32": loss32, "loss_bf16": loss16,
            "loss_rel_diff": rel_loss, "logits_max_diff_over_max": logit_err, "tolerance_loss": tol_loss,
            "tolerance_logits": tol_logits, "logits_dtype_under_autocast": str(raw16.dtype).replace("torch.", "")}


def check_gradient_checkpointing(device: torch.device, model_dir: Path) -> dict[str, Any]:
    """The gradients of one SFT loss with `model.gradient_checkpointing: true` (align's loading
    path) equal the plain model's."""
    from transformers import AutoModelForCausalLM

    from align import data as D
    from align.config import ModelConfig
    from align.modeling import load_pretrained, load_tokenizer
    from align.sft import sft_terms

    tok = load_tokenizer(str(model_dir))
    records = [D.Record(f"r:{i}", r) for i, r in enumerate(sft_records(4, 96, seed=2))]
    examples, _ = D.tokenize_sft(records, "prompt_response", "{prompt}", tok, 512, "drop")
    batch = {k: v.to(device) for k, v in D.pad_examples(examples, tok.pad_token_id).items()}
    grads = []
    for ckpt in (False, True):
        model = load_pretrained(AutoModelForCausalLM, ModelConfig(path=str(model_dir), gradient_checkpointing=ckpt),
                                tok, trainable=True, device=device)
        model.train()
        nll, n, _ = sft_terms(model, batch)
        (nll / n).backward()
        grads.append({k: p.grad.detach().float().clone() for k, p in model.named_parameters() if p.grad is not None})
        enabled = getattr(model, "is_gradient_checkpointing", False)
        del model
    plain, ckpt = grads
    worst = max(((plain[k] - ckpt[k]).abs().max() / plain[k].abs().max().clamp(min=1e-12)).item() for k in plain)
    tol = 1e-4
    return {"ok": plain.keys() == ckpt.keys() and worst < tol and bool(enabled), "checkpointing_enabled": bool(enabled),
            "parameters_with_grad": len(plain), "max_rel_grad_diff": worst, "tolerance": tol}


def check_device_placement(device: torch.device, model_dir: Path, work: Path) -> dict[str, Any]:
    """Where each PPO role lives (align.bundle.build_bundle), with a reward *model* so all four
    exist: everything on the accelerator by default; `reward.device: cpu` keeps the reward model on
    the CPU; `reward.offload` parks it there and brings it over only to score. Trained weights are
    float32, frozen ones `model.dtype` (auto: bf16 on a GPU)."""
    from transformers import AutoModelForSequenceClassification

    from align.bundle import build_bundle
    from align.config import PPOConfig, from_dict
    from align.generation import sample
    from align.modeling import load_tokenizer

    rm_dir = work / "placement-rm"
    if not rm_dir.exists():
        AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).save_pretrained(rm_dir)
        load_tokenizer(str(model_dir)).save_pretrained(rm_dir)
    prompts = write_jsonl(work / "placement-prompts.jsonl", prompt_records(8))

    def where(module: Any) -> dict[str, Any]:
        params = list(module.parameters())
        return {"devices": sorted({str(p.device) for p in params}),
                "dtypes": sorted({str(p.dtype).replace("torch.", "") for p in params})}

    out: dict[str, Any] = {}
    ok = True
    want = str(device) if device.type == "cpu" else f"{device.type}:{device.index or 0}"
    for name, extra in (("full", {}), ("lora", {"memory_mode": "lora"}), ("reward_on_cpu", {"reward": {"device": "cpu"}}),
                        ("reward_offload", {"reward": {"offload": True}})):
        cfg = from_dict(PPOConfig, {"output_dir": str(work / "unused"), "model": {"path": str(model_dir)},
                                    "data": {"train": str(prompts), "prompt_template": TEMPLATE},
                                    "reward": {"model": str(rm_dir), **extra.pop("reward", {})}, **extra})
        cfg.validate()
        tok = load_tokenizer(str(model_dir))
        bundle = build_bundle(cfg, tok, device, None)
        roles = {"actor": where(bundle.actor), "critic": where(bundle.critic), "reward": where(bundle.reward.model)}
        if bundle.reference is not None:
            roles["reference"] = where(bundle.reference)
        reward_home = "cpu" if name in ("reward_on_cpu", "reward_offload") else want
        expect = {"actor": want, "critic": want, "reward": reward_home, "reference": want}
        case_ok = all(r["devices"] == [expect[role]] for role, r in roles.items())
        case_ok &= (bundle.reference is None) == (name == "lora")
        if name == "reward_offload":  # scoring works and leaves the model parked again
            from align.data import bos_prefix

            ids = [bos_prefix(tok) + tok(r["prompt"], add_special_tokens=False).input_ids for r in prompt_records(4)]
            rollout = sample(bundle.actor, tok, ids, 4)
            scores = bundle.reward.scores(["x"] * 4, ["y"] * 4, rollout, ["x"] * 4)
            roles["reward_after_scoring"] = where(bundle.reward.model)
            case_ok &= roles["reward_after_scoring"]["devices"] == ["cpu"] and scores.device.type == device.type
        out[name] = {"ok": bool(case_ok), "roles": roles}
        ok &= bool(case_ok)
        del bundle
        free()
    return {"ok": ok, **out}


# ----------------------------------------------------------------------------------------------
# Throughput


def bench_sft(device: torch.device, mode: str, work: Path, peak_override: float | None) -> dict[str, Any]:
    from align.config import SFTConfig, from_dict
    from align.runtime import read_metrics
    from align.sft import train_sft

    w, sizes = WORK[mode], SIZES[mode]["sft"]
    model_dir, n_params = build_model(work / "sft-model", sizes, device, max_position=max(2048, w["sft_seq"]))
    n = w["sft_batch"] * w["sft_steps"]
    data = write_jsonl(work / "sft.jsonl", sft_records(n, w["sft_seq"]))
    out = work / "sft-run"
    cfg = from_dict(SFTConfig, {
        "output_dir": str(out), "seed": 0, "model": {"path": str(model_dir)},
        "data": {"train": str(data), "val_fraction": 0.0, "prompt_template": "{prompt}", "max_length": w["sft_seq"],
                 "truncation": "error"},
        "train": {"max_steps": w["sft_steps"], "batch_size": w["sft_batch"], "lr": 1e-4, "warmup_steps": 1,
                  "log_every": w["sft_log_every"], "eval_every": 10**6, "save_every": 10**6, "mixed_precision": "auto"}})
    cfg.validate()
    free()
    t0 = time.time()
    with captured_stdout() as log:
        summary = train_sft(cfg)
    wall = time.time() - t0
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "tokens_per_sec" in r]
    tokens_per_sec = steady_rate(rows, "tokens_per_sec")
    flops, flops_source = peak_flops(device, peak_override)
    mfu = 6 * n_params * tokens_per_sec / flops if flops and tokens_per_sec else None
    report = next((line for line in log.getvalue().splitlines() if line.startswith("sft: format")), "")
    result = {"model": {"architecture": "Qwen2ForCausalLM", **sizes, "tie_word_embeddings": True, "parameters": n_params},
              "sequence_length": w["sft_seq"], "batch_size": w["sft_batch"], "steps": summary["steps"],
              "tokens_per_sec": tokens_per_sec, "mfu": mfu, "peak_flops": flops, "peak_flops_source": flops_source,
              "mfu_formula": "6 * parameters * tokens_per_sec / peak_flops",
              "peak_memory_mb": peak_mb(), "train_time_sec": summary["train_time_sec"], "wall_sec": wall,
              "mixed_precision": "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no",
              "batches": report.split("batches: ")[-1].split(";")[0] if "batches: " in report else None,
              **memory_plan("sft", cfg, device, peak_mb())}
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(model_dir, ignore_errors=True)
    return result


def bench_rl(stage: str, device: torch.device, mode: str, work: Path, model_dir: Path) -> dict[str, Any]:
    """PPO (align's loop) or GRPO (TRL's trainer through align) in `full` and `lora` memory modes:
    episodes/s over the steps after the first, and the CUDA allocator's peak."""
    from align.config import GRPOStageConfig, PPOConfig, from_dict
    from align.runtime import read_metrics

    w = WORK[mode][stage]
    prompts = write_jsonl(work / "rl-prompts.jsonl", prompt_records(max(64, w["total_episodes"])))
    results: dict[str, Any] = {}
    for memory in ("full", "lora"):
        out = work / f"{stage}-{memory}"
        common = {"output_dir": str(out), "seed": 0, "model": {"path": str(model_dir)},
                  "reward": {"function": REWARD}, "data": {"train": str(prompts), "prompt_template": TEMPLATE,
                                                           "max_length": 128}}
        loop = {**w, "temperature": 1.0, "lr": 1e-5, "mixed_precision": "auto", "save_every": 10**6}
        # every online method runs in align's one RL loop (align/ppo.py), PPO's memory modes included
        cfg = from_dict(PPOConfig if stage == "ppo" else GRPOStageConfig, {
            **common, "memory_mode": memory, "lora": {"r": 16, "alpha": 32},
            "ppo": {**loop, "eval_every": 10**6, "sample_every": 10**6}})
        from align.ppo import train_ppo as train
        cfg.validate()
        free()
        t0 = time.time()
        with captured_stdout():
            summary = train(cfg)
        wall = time.time() - t0
        rows = read_metrics(out / "metrics.jsonl")
        results[memory] = {"episodes": summary["episodes"], "steps": summary["steps"],
                           "episodes_per_sec": steady_rate(rows, "episodes_per_sec"),
                           "episodes_per_sec_overall": summary["episodes"] / max(summary["train_time_sec"], 1e-9),
                           "peak_memory_mb": peak_mb(), "train_time_sec": summary["train_time_sec"], "wall_sec": wall,
                           "response_length": w["response_length"], **memory_plan(stage, cfg, device, peak_mb())}
        shutil.rmtree(out, ignore_errors=True)
    return results


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSON of results to write")
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU: the same code paths in under a minute")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="peak bf16 FLOP/s of the device for MFU, when the built-in table does not know it")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a fresh temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--only", nargs="*", choices=["checks", "sft", "ppo", "grpo"], default=None,
                        help="run only these sections")
    args = parser.parse_args(argv)
    quiet()
    mode = "smoke" if args.smoke else "gpu"
    if args.smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device; run with --smoke for the CPU check of the code paths", file=sys.stderr)
            return 2
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    import accelerate
    import peft
    import transformers
    import trl

    work = args.workdir or Path(tempfile.mkdtemp(prefix="align-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    results: dict[str, Any] = {
        "meta": {"mode": mode, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                 "peft": peft.__version__, "trl": trl.__version__, "accelerate": accelerate.__version__,
                 "python": platform.python_version(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")},
        "checks": {}, "sft": None, "ppo": None, "grpo": None, "errors": {}, "seconds": {},
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, args.out)

    def section(name: str, fn: Callable[[], Any], into: dict[str, Any] | None = None) -> None:
        t0 = time.time()
        print(f"[{time.time() - t_start:6.1f}s] {name} ...", flush=True)
        try:
            value = fn()
        except Exception as e:  # record and go on: one broken section must not lose the others
            results["errors"][name] = f"{type(e).__name__}: {e}\n" + traceback.format_exc(limit=8)
            print(f"  {name} failed: {type(e).__name__}: {e}", flush=True)
            value = None
        if into is not None:
            into[name] = value
        else:
            results[name] = value
        results["seconds"][name] = round(time.time() - t0, 2)
        save()
        free()

    wanted = set(args.only or ["checks", "sft", "ppo", "grpo"])
    try:
        if "checks" in wanted:
            check_dir, _ = build_model(work / "check-model", SIZES[mode]["check"], device, seed=1)
            section("bf16_autocast", lambda: check_bf16_autocast(device, check_dir), results["checks"])
            section("gradient_checkpointing", lambda: check_gradient_checkpointing(device, check_dir), results["checks"])
            section("device_placement", lambda: check_device_placement(device, check_dir, work), results["checks"])
        if "sft" in wanted:
            section("sft", lambda: bench_sft(device, mode, work, args.peak_flops))
        if wanted & {"ppo", "grpo"}:
            rl_dir, n_rl = build_model(work / "rl-model", SIZES[mode]["rl"], device, seed=2)
            results["meta"]["rl_model"] = {"architecture": "Qwen2ForCausalLM", **SIZES[mode]["rl"], "parameters": n_rl}
            for stage in ("ppo", "grpo"):
                if stage in wanted:
                    section(stage, lambda stage=stage: bench_rl(stage, device, mode, work, rl_dir))
    finally:
        results["seconds"]["total"] = round(time.time() - t_start, 2)
        save()
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    checks_ok = all(isinstance(c, dict) and c.get("ok") for c in results["checks"].values())
    print(f"wrote {args.out} in {results['seconds']['total']:.0f}s; checks {'ok' if checks_ok else 'FAILED'}; "
          f"{len(results['errors'])} section(s) raised", flush=True)
    return 0 if checks_ok and not results["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
