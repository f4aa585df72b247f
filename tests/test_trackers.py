"""`report_to`: every stage's metrics reach accelerate's trackers, and what each tracker stored, read
back with its own local reader (no network), equals metrics.jsonl: TensorBoard's event files,
wandb's offline run file, trackio's local store and an MLflow file store. The TRL-driven DPO stage
logs through our callback, so its trackers get our names too.

In CI the trackers extra is installed (`.ci/run`), so a backend that fails to import fails its test
there instead of skipping it."""

from __future__ import annotations

import glob
import importlib
import importlib.util
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from align.config import DPOStageConfig, PPOConfig, from_dict
from align.rundir import read_metrics

pytestmark = pytest.mark.slow

BACKENDS = ("tensorboard", "wandb", "trackio", "mlflow")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TEMPLATE = "Q: {prompt}\nA: "


def backend(module: str) -> Any:
    """The backend's package: skipped where it is not installed, except in CI, where it must be."""
    return importlib.import_module(module) if IN_CI else pytest.importorskip(module)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, make_sft_config: Any) -> dict[str, Any]:
    """SFT, DPO and PPO runs of a few steps, each reporting to every installed tracker (all four in CI)."""
    from align.dpo import train_dpo
    from align.ppo import train_ppo
    from align.sft import train_sft
    from align.tasks.addition import build

    root = tmp_path_factory.mktemp("trackers")
    names = [n for n in BACKENDS if IN_CI or importlib.util.find_spec(n)]
    data = build(root / "data", seed=0, n_digits=1, n_sft=40, n_pref=48, n_prompts=32, n_eval=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.delenv("WANDB_DIR", raising=False)  # align then puts wandb's files in the run directory
        mp.setenv("MLFLOW_TRACKING_URI", f"file:{root / 'mlruns'}")
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this switch
        train_sft(make_sft_config(root / "sft", {"train.max_steps": 4, "train.eval_every": 2, "train.report_to": names}))
        dpo = from_dict(DPOStageConfig, {
            "output_dir": str(root / "dpo"), "seed": 0, "model": {"path": str(tiny_model_dir)},
            "data": {"train": str(data["pref_train"]), "validation": str(data["pref_val"]),
                     "prompt_template": TEMPLATE, "max_length": 24},
            "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "log_every": 1, "save_every": 100,
                      "eval_every": 2, "warmup_steps": 1, "min_lr_ratio": 0.1, "mixed_precision": "no",
                      "report_to": names}})
        dpo.validate()
        train_dpo(dpo)
        ppo = from_dict(PPOConfig, {
            "output_dir": str(root / "ppo"), "seed": 0, "model": {"path": str(tiny_model_dir)},
            "reward": {"function": "toy_rewards:fraction_of_sevens"},
            "data": {"train": str(data["prompts"]), "prompt_template": TEMPLATE, "max_length": 16},
            "eval": {"prompts": str(data["eval"])},
            "ppo": {"total_episodes": 32, "rollout_batch_size": 8, "mini_batch_size": 8, "micro_batch_size": 8,
                    "ppo_epochs": 1, "response_length": 4, "lr": 1e-3, "mixed_precision": "no", "eval_every": 2,
                    "sample_every": 1000, "save_every": 1000, "lr_scheduler_type": "linear", "warmup_steps": 2,
                    "report_to": names}})
        ppo.validate()
        train_ppo(ppo)
    return {"root": root, "names": names, "configs": {"dpo": dpo, "ppo": ppo}}


def expected(run: Path) -> dict[tuple[int, str], float]:
    """metrics.jsonl's numbers by (step, key); a later row of the same step wins, as in a tracker."""
    out: dict[tuple[int, str], float] = {}
    for row in read_metrics(run / "metrics.jsonl"):
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                out[(row["step"], k)] = float(v)
    return out


def same(got: dict[tuple[int, str], float], want: dict[tuple[int, str], float]) -> None:
    assert want, "metrics.jsonl has no numbers"
    missing = sorted(set(want) - set(got))
    assert not missing, f"not in the tracker: {missing[:5]}"
    wrong = {k: (got[k], v) for k, v in want.items() if got[k] != v}
    assert not wrong, f"(tracker, metrics.jsonl) differ: {dict(list(wrong.items())[:5])}"


STAGES = ("sft", "dpo", "ppo")


@pytest.mark.parametrize("stage", STAGES)
def test_tensorboard_reads_back_metrics_jsonl(runs: dict[str, Any], stage: str) -> None:
    backend("tensorboard")
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = runs["root"] / stage
    acc = EventAccumulator(str(run / "tensorboard" / "align"))
    acc.Reload()
    got = {(e.step, tag): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    # TensorBoard stores scalars as float32
    same(got, {k: float(np.float32(v)) for k, v in expected(run).items()})


def wandb_history(run: Path) -> dict[tuple[int, str], float]:
    """History rows of the offline run file `run-*.wandb`, decoded into wandb's own protobuf records.
    wandb 0.31 no longer ships its Python reader of these files; their framing is LevelDB's log format
    (wandb-core's `leveldb` package, as the reader wandb shipped until 0.18 documented it): a 7-byte file
    header (':W&B', magic 0xBEE1, version 0), then 32 KiB blocks of records, each with a 7-byte header
    (crc32, length, type: 1 full, 2 first, 3 middle, 4 last), a block's tail shorter than a header
    padded with zeros."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B" and struct.unpack("<HB", raw[4:7]) == (0xBEE1, 0)
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # no room for a header: the rest of the block is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            records.append(pending)
    out: dict[tuple[int, str], float] = {}
    for data in records:
        record = pb.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            step = items.pop("_step")
            out.update({(step, k): float(v) for k, v in items.items() if not k.startswith("_")
                        and isinstance(v, (int, float))})
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_wandb_offline_run_reads_back_metrics_jsonl(runs: dict[str, Any], stage: str) -> None:
    backend("wandb")
    run = runs["root"] / stage
    same(wandb_history(run), expected(run))


@pytest.mark.parametrize("stage", STAGES)
def test_trackio_local_store_reads_back_metrics_jsonl(runs: dict[str, Any], stage: str) -> None:
    backend("trackio")
    from trackio.sqlite_storage import SQLiteStorage
    from trackio.utils import TRACKIO_DIR

    assert Path(TRACKIO_DIR) == Path(os.environ["TRACKIO_DIR"])  # its local store (conftest's), never a hub Space
    run = runs["root"] / stage
    got = {}
    for row in SQLiteStorage.get_logs("align", f"{run.parent.name}/{stage}"):
        got.update({(row["step"], k): float(v) for k, v in row.items()
                    if k not in ("step", "timestamp") and isinstance(v, (int, float))})
    same(got, expected(run))


@pytest.mark.parametrize("stage", STAGES)
def test_mlflow_file_store_reads_back_metrics_jsonl(runs: dict[str, Any], stage: str) -> None:
    backend("mlflow")
    from mlflow.tracking import MlflowClient

    run = runs["root"] / stage
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=f"file:{runs['root'] / 'mlruns'}")
        experiment = client.get_experiment_by_name("align")
        (found,) = client.search_runs([experiment.experiment_id],
                                      filter_string=f"tags.`mlflow.runName` = '{run.parent.name}/{stage}'")
        want = expected(run)
        got = {}
        for key in {k for _, k in want}:
            for m in sorted(client.get_metric_history(found.info.run_id, key), key=lambda m: m.timestamp):
                got[(m.step, key)] = m.value
        assert found.data.params["seed"] == "0"  # the config, as the run's parameters
    same(got, want)


def test_trl_stage_and_rl_loop_learning_rates_are_the_configured_schedules(runs: dict[str, Any]) -> None:
    """DPO: TRL's trainer builds `cosine_with_min_lr` through get_scheduler from our arguments; the
    RL loop: `linear` with 2 warmup steps, through make_scheduler. TRL logs the lr step s trained
    with; align's own loops log, after step s, the lr of the step to come (as they always have)."""
    import torch

    from align.runtime import make_scheduler

    for stage, steps in (("dpo", 3), ("ppo", 4)):
        cfg = runs["configs"][stage]
        o = cfg.train if stage == "dpo" else cfg.ppo
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=o.lr)
        sched, schedule = make_scheduler(opt, o, steps), []
        for _ in range(steps + 1):
            schedule.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        got = [r["lr"] for r in read_metrics(runs["root"] / stage / "metrics.jsonl") if "lr" in r]
        assert got == (schedule[:steps] if stage == "dpo" else schedule[1:]), stage
    assert got == [5e-4, 1e-3, 5e-4, 0.0]


def test_a_tracker_that_is_not_installed_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              make_sft_dict: Any, yaml_writer: Any) -> None:
    from click.testing import CliRunner

    from align import runtime
    from align.cli import main

    monkeypatch.setitem(runtime.TRACKER_MODULES, "wandb", ("no_such_module_for_align_tests",))
    config = yaml_writer(tmp_path / "sft.yaml", make_sft_dict(tmp_path / "run", {"train.report_to": ["wandb"]}))
    result = CliRunner().invoke(main, ["sft", str(config), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == ("error: config key 'train.report_to' names wandb, which is not installed: "
                                     "pip install \"align[trackers]\" (or set train.report_to=[])")
