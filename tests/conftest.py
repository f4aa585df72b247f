"""Shared fixtures for the SFT suite: one tiny model and tokenizer, toy data, config builders and a
CLI runner for subprocesses. Everything is built once per session under pytest's tmp dir; no hub.

Tiny models gain nothing from intra-op threads, and the suite shares two cores with the
subprocesses it starts, so every process uses one thread. That also makes in-process and
subprocess runs use the same kernels, so their results can be compared exactly.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

# trackio fixes its local store's directory when first imported (`trackio.utils.TRACKIO_DIR`), and a
# library may import it before tests/test_trackers.py runs: one temporary store for the whole
# session, set before anything imports it (and never the user's ~/.cache).
os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="align-tests-trackio-")

import pytest
import torch
import yaml

from align.config import SFTConfig, from_dict, set_dotted

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                  "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
                      p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p)}
SUBPROCESS_TIMEOUT = 300

TEMPLATE = "Q: {prompt}\nA: "
"""The prompt template of the SFT runs: not the default, so `align generate` must find it."""


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide Llama-style model with the byte-level tokenizer, saved like a checkpoint."""
    from align.modeling import init_tiny_model

    return init_tiny_model(tmp_path_factory.mktemp("models") / "tiny", hidden=32, layers=2, heads=4,
                           max_position=64, seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> Any:
    from align.modeling import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="session")
def addition_prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 64 one-digit addition prompts `a+b=` the RL tests sample from."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}+{b}="}) + "\n" for a in range(8) for b in range(8)))
    return path


@pytest.fixture(scope="session")
def addition_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One-digit addition from the flawed demonstrator: {prompt, response} JSONL files."""
    from align.tasks.addition import build

    return build(tmp_path_factory.mktemp("addition"), seed=0, n_digits=1, n_sft=240, n_pref=0,
                 n_prompts=0, n_eval=10)


@pytest.fixture(scope="session")
def sft_base(tiny_model_dir: Path, addition_data: dict[str, Path]) -> dict[str, Any]:
    """A small SFT config as a plain dict (what a YAML file holds), without `output_dir`.
    Copy it before changing it."""
    return {
        "seed": 0,
        "model": {"path": str(tiny_model_dir)},
        "data": {"train": str(addition_data["sft_train"]), "validation": str(addition_data["sft_val"]),
                 "prompt_template": TEMPLATE, "max_length": 24},
        "train": {"max_steps": 20, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 5,
                  "log_every": 1, "save_every": 1000, "mixed_precision": "no"},
    }


def sft_dict(base: dict[str, Any], output_dir: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    data = {"output_dir": str(output_dir), **copy.deepcopy(base)}
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return data


@pytest.fixture(scope="session")
def make_sft_dict(sft_base: dict[str, Any]) -> Callable[..., dict[str, Any]]:
    """`make_sft_dict(output_dir, {"train.lr": 1e-3, ...})` -> the config as a dict (for YAML files)."""
    return lambda output_dir, overrides=None: sft_dict(sft_base, output_dir, overrides)


@pytest.fixture(scope="session")
def make_sft_config(sft_base: dict[str, Any]) -> Callable[..., SFTConfig]:
    """`make_sft_config(output_dir, {"train.lr": 1e-3, ...})` -> a validated SFTConfig."""

    def make(output_dir: str | Path, overrides: dict[str, Any] | None = None) -> SFTConfig:
        cfg = from_dict(SFTConfig, sft_dict(sft_base, output_dir, overrides))
        cfg.validate()
        return cfg

    return make


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def run_align(*args: str, cwd: Path | None = None, module_args: list[str] | None = None,
              timeout: float = SUBPROCESS_TIMEOUT) -> subprocess.CompletedProcess:
    """`python -m align ARGS` (or `python [module_args] ARGS` when given) in a fresh process."""
    cmd = [sys.executable, *(module_args or ["-m", "align"]), *args]
    return subprocess.run(cmd, cwd=cwd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def align_cli() -> Callable[..., subprocess.CompletedProcess]:
    return run_align


@pytest.fixture(scope="session")
def yaml_writer() -> Callable[[Path, dict[str, Any]], Path]:
    return write_yaml


def read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


@pytest.fixture(scope="session")
def load_weights() -> Callable[[Path], dict[str, torch.Tensor]]:
    return read_safetensors


def killed_after_step_2(run: Path, cut: Path) -> Path:
    """A copy of a finished run as a kill right after its step-2 checkpoint would have left it."""
    import shutil

    shutil.copytree(run, cut)
    shutil.rmtree(cut / "model")
    (cut / "summary.json").unlink()
    for p in (cut / "checkpoints").glob("step-*"):
        if p.name != "step-0000002":
            shutil.rmtree(p)
    (cut / "checkpoints" / "latest").write_text("step-0000002")
    return cut


@pytest.fixture(scope="session")
def cut_after_step_2() -> Callable[[Path, Path], Path]:
    return killed_after_step_2
