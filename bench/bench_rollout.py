#!/usr/bin/env python
"""Rollout tokens/s: the `vllm` rollout engine against `hf` (transformers' generate) on the PPO
peer's policy, in one process, alternating. One JSON line. Run it in the vLLM environment:

    .venvs/vllm/bin/python bench/bench_rollout.py --hidden 512 --layers 8 [--prompts 64] [--tokens 16]
        [--runs 3] [--threads 1] [--temperature 0.7] [--compile]

Both engines sample `--prompts` of the peer's prompts x `--tokens` new tokens at the PPO bench's
temperature (0.7) from the same fp32 weights (`align.rollout`'s engines, exactly as the RL loop
calls them); each is warmed up with one call, then timed `--runs` times, hf and vllm alternating
(the order swapped every round). tokens/s = response tokens generated (EOS included) / wall time
of the generate call, and per CPU-second of this process (`time.process_time`: what a shared,
loaded machine distorts least); the medians and their ratios are printed, with the engine's start
time and one weight sync's time. `--compile`: `rollout.enforce_eager: false` (vLLM compiles the model).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (sets offline env and sys.path)
from common import build_in_subprocess, emit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--compile", action="store_true", help="let vLLM compile the model (enforce_eager false)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoConfig, AutoModelForCausalLM

    from align import data as D
    from align.config import ModelConfig
    from align.modeling import count_parameters, load_pretrained, load_tokenizer
    from align.rollout import EngineSettings, get_engine

    root = Path(tempfile.mkdtemp(prefix="align_bench_rollout_"))
    paths = build_in_subprocess("ppo", root, args.hidden, args.layers, num_prompts=args.prompts, seed=args.seed)
    tok = load_tokenizer(str(paths["policy"]))
    model = load_pretrained(AutoModelForCausalLM, ModelConfig(path=str(paths["policy"]), dtype="float32"), tok,
                            trainable=True, device=torch.device("cpu"))
    prompts = [q.ids for q in D.load_prompts(str(paths["prompts"]), "auto", "{prompt}", tok, 64, "drop")[0]]
    settings = EngineSettings(str(paths["policy"]), AutoConfig.from_pretrained(paths["policy"]), tok.eos_token_id,
                              tok.pad_token_id, len(tok), max(map(len, prompts)) + args.tokens, len(prompts),
                              "float32", args.seed, 0.3, False, enforce_eager=not args.compile)
    engines = {}
    for name in ("hf", "vllm"):
        spec = get_engine(name)
        t0 = time.perf_counter()
        spec.check(settings)
        engines[name] = spec.build(settings, model, tok)
        start = time.perf_counter() - t0
        if name == "vllm":
            vllm_start = start
    t0 = time.perf_counter()
    engines["vllm"].load_weights(model)
    sync = time.perf_counter() - t0

    def timed(name: str) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        r = engines[name].generate(prompts, args.tokens, temperature=args.temperature)
        n = r.response_mask.sum().item()
        return n / (time.perf_counter() - t0), n / (time.process_time() - c0)

    torch.manual_seed(args.seed)
    for name in engines:  # warm-up: first-call allocations, lazy imports
        timed(name)
    rates: dict[str, list[float]] = {"hf": [], "vllm": []}
    cpu: dict[str, list[float]] = {"hf": [], "vllm": []}
    for i in range(args.runs):
        for name in (("hf", "vllm") if i % 2 == 0 else ("vllm", "hf")):
            wall, busy = timed(name)
            rates[name].append(wall)
            cpu[name].append(busy)
    hf, vl = statistics.median(rates["hf"]), statistics.median(rates["vllm"])
    hf_cpu, vl_cpu = statistics.median(cpu["hf"]), statistics.median(cpu["vllm"])
    import transformers
    import vllm

    emit({"bench": "rollout", "hidden": args.hidden, "layers": args.layers, "parameters": count_parameters(model)[1],
          "prompts": len(prompts), "tokens": args.tokens, "threads": args.threads, "compile": args.compile,
          "hf_tokens_per_sec": hf, "vllm_tokens_per_sec": vl, "ratio": vl / hf, "runs_hf": rates["hf"],
          "runs_vllm": rates["vllm"], "hf_tokens_per_cpu_sec": hf_cpu, "vllm_tokens_per_cpu_sec": vl_cpu,
          "cpu_ratio": vl_cpu / hf_cpu, "vllm_start_sec": vllm_start, "weight_sync_sec": sync,
          "load_avg": os.getloadavg()[0], "torch": torch.__version__, "transformers": transformers.__version__,
          "vllm": vllm.__version__})
    engines["vllm"].close()


if __name__ == "__main__":
    main()
