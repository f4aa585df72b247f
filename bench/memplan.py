"""The memory plan (align/memplan.py) against measured peak memory on CPU.

    python bench/memplan.py                       # the table of docs/performance.md ("Memory plan")
    python bench/memplan.py --sizes 128x4 --runs sft,ppo_full

For each model size (built with `align init-model`) and each run, a fresh Python process imports
everything, warms torch up on a throwaway model (so kernels, thread pools and lazy imports are
already paid for), reads its resident set size, then calls align's `train_sft` / `train_ppo` on
the run's config; its peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`) minus the RSS before the call
is the measured peak. The plan is `align.memplan.stage_plan` on the same config, device cpu.

Why RSS, and why glibc is told to map every block above 64 KiB on its own (MALLOC_MMAP_THRESHOLD_):
torch has no peak-allocation counter for CPU tensors (the CUDA allocator's
`max_memory_allocated` has no CPU twin; tracemalloc does not see torch's allocations; the
profiler's memory view is too slow for whole runs). RSS sees every tensor, but by default glibc
serves freed blocks below its dynamic threshold (up to 32 MiB) from a heap it rarely returns, so
RSS would keep the largest heap ever used rather than follow the live tensors. With a fixed
64 KiB threshold every tensor above it is its own mapping, returned on free, and RSS tracks the
live bytes plus the small allocations of Python and the libraries.

Also `--layer-check`: the bytes autograd saves per token in one decoder layer, counted with
`torch.autograd.graph.saved_tensors_hooks`, against `memplan.layer_saved` (full, LoRA, LoRA on
q/v only; float32).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

REWARD = "align.tasks.addition:gold_reward"
SFT_LENGTH, SFT_BATCH = 256, 8
PROMPT, RESPONSE, ROLLOUT = 64, 64, 8

RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "sft": ("sft", {}),
    "sft_lora": ("sft", {"lora": {"enabled": True, "r": 8}}),
    "sft_ckpt": ("sft", {"model": {"gradient_checkpointing": True}}),
    "ppo_full": ("ppo", {}),
    "ppo_lora": ("ppo", {"memory_mode": "lora", "critic": {"lora": True}}),
    "ppo_shared": ("ppo", {"critic": {"share_actor": True}}),
    "grpo": ("grpo", {}),
    "ppo_rm": ("ppo", {"reward": "model"}),  # a reward model (a score head on the same backbone), not a function
    "sft_bf16": ("sft", {"train": {"mixed_precision": "bf16"}}),  # CPU autocast: the bf16 counting, checked
    "ppo_bf16": ("ppo", {"ppo": {"mixed_precision": "bf16"}}),
}


def rss_now() -> int:
    """Resident set size of this process now, in bytes (Linux: /proc/self/statm)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def make_data(work: Path) -> dict[str, Path]:
    """SFT examples of 200-255 tokens (padding in every batch, as in real data) and prompts of
    exactly PROMPT tokens with the byte tokenizer (one token per character, BOS added)."""
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 "
    text = lambda n: "".join(rng.choice(alphabet) for _ in range(n))  # noqa: E731
    sft = work / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": text(32), "response": text(rng.randint(166, SFT_LENGTH - 34))}) + "\n"
                           for _ in range(64)))
    prompts = work / "prompts.jsonl"
    # `a+b=` at the end: the gold reward reads the problem from the prompt
    problems = [f" {rng.randint(10, 99)}+{rng.randint(10, 99)}=" for _ in range(64)]
    prompts.write_text("".join(json.dumps({"prompt": text(PROMPT - 8) + p}) + "\n" for p in problems))
    return {"sft": sft, "prompts": prompts}


def config_dict(run: str, model: Path, data: dict[str, Path], out: Path) -> tuple[str, dict[str, Any]]:
    stage, extra = RUNS[run]
    if stage == "sft":
        cfg = {"output_dir": str(out), "seed": 0, "model": {"path": str(model)},
               "data": {"train": str(data["sft"]), "val_fraction": 0.0, "max_length": SFT_LENGTH},
               "train": {"max_steps": 3, "batch_size": SFT_BATCH, "lr": 1e-4, "log_every": 1, "eval_every": 10**6,
                         "save_every": 10**6, "mixed_precision": "no"}}
    else:
        loop = {"total_episodes": 2 * ROLLOUT, "rollout_batch_size": ROLLOUT, "mini_batch_size": ROLLOUT,
                "micro_batch_size": ROLLOUT, "ppo_epochs": 2, "response_length": RESPONSE, "temperature": 1.0,
                "lr": 1e-5, "mixed_precision": "no", "save_every": 10**6, "eval_every": 10**6,
                "sample_every": 10**6}
        if stage == "grpo":
            loop.update(n_samples_per_prompt=4, ppo_epochs=1)
        cfg = {"output_dir": str(out), "seed": 0, "model": {"path": str(model)}, "reward": {"function": REWARD},
               "data": {"train": str(data["prompts"]), "max_length": PROMPT}, "ppo": loop}
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    if extra.get("reward") == "model":
        cfg["reward"] = {"model": str(reward_model(model))}
    return stage, cfg


def reward_model(model: Path) -> Path:
    """A sequence classifier on `model`'s backbone, saved beside it (as `align rm` saves one)."""
    out = model.with_name(model.name + "-rm")
    if not out.exists():
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        AutoModelForSequenceClassification.from_pretrained(model, num_labels=1).save_pretrained(out)
        AutoTokenizer.from_pretrained(model).save_pretrained(out)
    return out


def config_class(stage: str) -> Any:
    from align.stages import get_stage

    return get_stage(stage).config


def child(spec: dict[str, Any]) -> None:
    """One measurement, in this fresh process: a warm-up run, the RSS, the run, its peak."""
    import contextlib
    import io

    import torch

    torch.set_num_threads(1)
    from align.config import build_config
    from align.modeling import init_tiny_model
    from align.ppo import train_ppo
    from align.rundir import read_metrics
    from align.sft import train_sft

    run = train_sft if spec["stage"] == "sft" else train_ppo
    # Warm-up: the same run on a throwaway 1-layer model, so every kernel's code pages, every lazy
    # import and thread pool the run touches are resident before the baseline is read.
    work = Path(spec["work"])
    warm = work / "warm-model"
    if not warm.exists():
        init_tiny_model(warm, hidden=32, layers=1, heads=4, max_position=512)
    warm_cfg = json.loads(json.dumps(spec["config"]))
    warm_cfg["model"]["path"], warm_cfg["output_dir"] = str(warm), str(work / f"warm-run-{os.getpid()}")
    with contextlib.redirect_stdout(io.StringIO()):
        run(build_config(config_class(spec["stage"]), warm_cfg))
    cfg = build_config(config_class(spec["stage"]), spec["config"])
    base = rss_now()
    with contextlib.redirect_stdout(io.StringIO()):
        run(cfg)
    # The run logs its peak RSS after every step (`peak_memory_mb`, ru_maxrss in KiB / 1024): the
    # last step's is the training peak, without the final model's save.
    steps = [r for r in read_metrics(Path(cfg.output_dir) / "metrics.jsonl") if "peak_memory_mb" in r]
    peak = int(steps[-1]["peak_memory_mb"] * 2**20)
    print(json.dumps({"baseline": base, "peak": peak, "measured": peak - base, "peak_with_save": rss_peak()}))


def predicted(stage: str, cfg_dict: dict[str, Any]) -> tuple[float, str, dict[str, float]]:
    from align.config import build_config
    from align.memplan import model_facts, stage_plan

    cfg = build_config(config_class(stage), cfg_dict)
    plan = stage_plan(stage, cfg, model_facts(stage, cfg), device="cpu")
    parts = {i.name: i.bytes for i in plan.resident}
    parts.update({f"+{i.name}": i.bytes for i in plan.phases})
    return plan.peak_bytes, plan.peak_phase.name, parts


def measure(stage: str, cfg_dict: dict[str, Any], work: Path) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p)}
    spec = {"stage": stage, "config": cfg_dict, "work": str(work)}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def layer_check() -> list[dict[str, Any]]:
    """Saved bytes per token of one LlamaDecoderLayer (float32), counted against the formula."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from align.memplan import LoraTargets, ModelShape, layer_saved

    torch.set_num_threads(1)
    rows = []
    B, T = 2, 48
    for h, heads, kv, inter in ((128, 4, 4, 512), (256, 8, 2, 704)):
        config = LlamaConfig(hidden_size=h, num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                             num_hidden_layers=1, vocab_size=260, max_position_embeddings=128)
        config._attn_implementation = "sdpa"
        for name, lora, autocast in (("full", None, False), ("lora all", LoraTargets(8), False),
                                     ("lora q,v", LoraTargets(8, frozenset({"q_proj", "v_proj"})), False),
                                     ("full, bf16 autocast", None, True)):
            layer = LlamaDecoderLayer(config, 0)
            if lora is not None:
                from peft import LoraConfig as PeftLora, get_peft_model

                target = "all-linear" if lora.modules is None else sorted(lora.modules)
                holder = torch.nn.Sequential(layer)
                layer = get_peft_model(holder, PeftLora(r=8, lora_alpha=16, target_modules=target)).base_model.model[0]
            x = torch.randn(B, T, h, requires_grad=True)  # the residual stream, as a trained layer below it makes it
            mask = torch.ones(B, 1, T, T, dtype=torch.bool).tril()
            position_ids = torch.arange(T)[None].expand(B, T)
            cos_sin = LlamaRotaryEmbedding(config)(x, position_ids)
            cos_sin = tuple(t.detach() for t in cos_sin)
            skip = {p.untyped_storage().data_ptr() for p in layer.parameters()}
            skip |= {t.untyped_storage().data_ptr() for t in (x, *cos_sin)}
            seen: dict[int, int] = {}

            def pack(t: torch.Tensor) -> torch.Tensor:
                storage = t.untyped_storage()
                if storage.data_ptr() not in skip:
                    seen.setdefault(storage.data_ptr(), storage.nbytes())
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                    torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                layer(x, attention_mask=mask, position_embeddings=cos_sin, position_ids=position_ids)
            counted = sum(seen.values())
            if autocast:  # the bf16 weight copies autograd keeps: the plan counts them apart, per model
                counted -= 2 * sum(p.numel() for p in layer.parameters() if p.ndim == 2)
            counted /= B * T
            # The layer's input x is saved by its first norm; the formula counts it in the layer.
            counted += 4 * h
            shape = ModelShape(hidden=h, layers=1, heads=heads, kv_heads=kv, intermediate=inter, vocab=260)
            rows.append({"layer": f"h={h} heads={heads} kv={kv} I={inter}", "mode": name, "counted": counted,
                         "formula": layer_saved(shape, T, 2 if autocast else 4, autocast, lora)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="128x4,256x8,512x8", help="HIDDENxLAYERS, comma-separated")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--layer-check", action="store_true", help="only the saved-tensor count of one layer")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON lines here")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.layer_check:
        for r in layer_check():
            print(f"| {r['layer']} | {r['mode']} | {r['counted']:,.0f} | {r['formula']:,.0f} | "
                  f"{100 * (r['formula'] / r['counted'] - 1):+.1f}% |")
        return
    import torch
    import transformers

    print(f"# python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs; 1 thread per run; MALLOC_MMAP_THRESHOLD_=65536")
    print("| model | run | phase at peak (plan) | plan (MiB) | measured (MiB) | plan / measured |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = []
    with tempfile.TemporaryDirectory(prefix="align-memplan-") as tmp:
        work = Path(tmp)
        data = make_data(work)
        for size in args.sizes.split(","):
            hidden, layers = map(int, size.split("x"))
            model = work / f"model-{size}"
            heads = max(4, hidden // 64)
            subprocess.run([sys.executable, "-m", "align", "init-model", str(model), "--hidden", str(hidden),
                            "--layers", str(layers), "--heads", str(heads), "--max-position", "512"], check=True,
                           capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            for i, run in enumerate(args.runs.split(",")):
                stage, cfg = config_dict(run, model, data, work / f"run-{size}-{run}")
                plan, phase, parts = predicted(stage, cfg)
                got = measure(stage, cfg, work)
                row = {"model": f"H={hidden} L={layers}", "run": run, "phase": phase, "plan": plan,
                       "measured": got["measured"], "baseline": got["baseline"], "parts": parts}
                rows.append(row)
                print(f"| {row['model']} | {run} | {phase} | {plan / 2**20:,.1f} | {got['measured'] / 2**20:,.1f} | "
                      f"{plan / got['measured']:.2f} |", flush=True)
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
