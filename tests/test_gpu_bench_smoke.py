"""bench/gpu/run.py --smoke: the GPU benchmark's code paths on CPU with tiny models, so a broken
bench is found here rather than on a rented GPU. Checks the JSON it writes, not the numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_run_writes_every_result(tmp_path: Path, align_cli: Callable[..., Any]) -> None:
    out = tmp_path / "gpu.json"
    proc = align_cli("--smoke", "--out", str(out), module_args=[str(REPO / "bench" / "gpu" / "run.py")], timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result) == {"meta", "checks", "sft", "ppo", "grpo", "errors", "seconds"}
    assert result["errors"] == {}
    assert result["meta"]["mode"] == "smoke" and result["meta"]["device"] == "cpu"
    for key in ("torch", "transformers", "peft", "trl", "accelerate", "rl_model"):
        assert key in result["meta"], key

    checks = result["checks"]
    assert set(checks) == {"bf16_autocast", "gradient_checkpointing", "device_placement"}
    assert all(c["ok"] for c in checks.values()), checks
    assert checks["bf16_autocast"]["logits_dtype_under_autocast"] == "bfloat16"
    assert checks["gradient_checkpointing"]["checkpointing_enabled"]
    assert set(checks["device_placement"]) == {"ok", "full", "lora", "reward_on_cpu", "reward_offload"}
    assert set(checks["device_placement"]["full"]["roles"]) == {"actor", "critic", "reward", "reference"}
    assert "reference" not in checks["device_placement"]["lora"]["roles"]  # the actor with its adapter disabled

    sft = result["sft"]
    for key in ("model", "sequence_length", "batch_size", "steps", "tokens_per_sec", "mfu", "peak_flops",
                "peak_flops_source", "peak_memory_mb", "train_time_sec", "mixed_precision", "memory_plan_mb",
                "memory_plan_phase", "memory_plan_over_measured"):
        assert key in sft, key
    assert sft["tokens_per_sec"] > 0 and sft["model"]["parameters"] > 0
    assert sft["mfu"] is None  # no peak FLOP/s known for a CPU without --peak-flops
    assert sft["memory_plan_mb"] > 0 and sft["memory_plan_phase"] == "forward + backward"

    for stage in ("ppo", "grpo"):
        assert set(result[stage]) == {"full", "lora"}
        for mode in ("full", "lora"):
            row = result[stage][mode]
            for key in ("episodes", "steps", "episodes_per_sec", "peak_memory_mb", "train_time_sec", "memory_plan_mb"):
                assert key in row, (stage, mode, key)
            assert row["memory_plan_mb"] > 0 and row["memory_plan_over_measured"] is None  # no CUDA peak on CPU
            assert row["episodes_per_sec"] > 0 and math.isfinite(row["episodes_per_sec"])
    assert result["seconds"]["total"] > 0


def test_peak_flops_table_and_override() -> None:
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("align_gpu_bench", REPO / "bench" / "gpu" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.peak_flops(torch.device("cpu"), None)[0] is None
    assert bench.peak_flops(torch.device("cpu"), 1e12) == (1e12, "--peak-flops")
    for name, flops in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                        ("NVIDIA H100 PCIe", None), ("NVIDIA L4", None)]:
        assert bench.peak_flops_for_name(name)[0] == flops, name
    assert set(bench.RESULT_KEYS) == {"meta", "checks", "sft", "ppo", "grpo", "errors", "seconds"}
    assert bench.SIZES["gpu"]["sft"] == {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                                         "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936}
