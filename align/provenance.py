"""Provenance: what produced a run's numbers. Every run directory gets `provenance.json` beside its
`config.yaml`, and every report prints it: package versions, Python, the CPU and its vector
extensions (the default recipe's numbers moved by 9 points between an AVX-512 and an AVX2 machine
with different transformers versions), torch's threads, the device, the git commit when the code
runs from a checkout. Input-file hashes are in `inputs.json` (align/rundir.py). Torch-free: the
thread count and device come from torch only when it is already imported.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "numpy", "safetensors",
            "align")


def cpu_flags() -> dict[str, Any]:
    """The CPU model and which of the vector extensions torch's kernels dispatch on it has."""
    info: dict[str, Any] = {"machine": platform.machine()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith("model name"):
            info["cpu"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            info["vector"] = [f for f in ("avx512f", "avx512_bf16", "amx_tile", "avx2", "fma") if f in flags]
            break
    return info


def git_commit() -> str | None:
    """The commit of the checkout align runs from (with `+dirty` for uncommitted changes), if any."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


def provenance() -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    out: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(), "packages": versions,
                           **cpu_flags(), "git_commit": git_commit(),
                           "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch_threads"] = torch.get_num_threads()
        out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return out


def provenance_text(info: dict[str, Any] | None = None) -> str:
    """One paragraph for a report, no machine paths."""
    p = info or provenance()
    pkgs = ", ".join(f"{k} {v}" for k, v in p["packages"].items())
    parts = [f"Python {p['python']}; {pkgs}", f"CPU: {p.get('cpu', p['machine'])} ({', '.join(p.get('vector', [])) or 'no AVX'})"]
    if p.get("device"):
        parts.append(f"device {p['device']}, {p.get('torch_threads')} torch thread(s)")
    if p.get("omp_num_threads"):
        parts.append(f"OMP_NUM_THREADS={p['omp_num_threads']}")
    parts.append(f"git commit {p['git_commit']}" if p.get("git_commit") else "not run from a git checkout")
    return "; ".join(parts) + "."
