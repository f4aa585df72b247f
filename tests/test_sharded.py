"""Sharded training in 2 CPU processes over gloo, each strategy launched with its accelerate config
file (configs/accelerate/): FSDP2, DeepSpeed ZeRO-2 and ZeRO-3.

Each strategy runs one recipe (`align run`: SFT, reward model, PPO with its separate critic, which
warms up for a step, and GRPO with a LoRA actor; SFT or the reward model, or both, with LoRA, as
STRATEGIES says) through `accelerate launch`;
the run is SIGKILLed at a chosen step of a chosen stage (tests/kill_in_stage.py) and launched again,
which resumes it. What the finished run must show, against references with the same global batch:

- SFT and the reward model equal one process (batch 8 = 2 processes x 4, grad_accum 2; LoRA
  against a one-process LoRA run, the reward model's merged final model included): every
  logged loss, accuracy, gradient norm and validation loss (rel 1e-5), and the final weights
  (max abs difference 2e-5, float32 rounding of a different reduction order);
- PPO and GRPO equal DDP in the same 2 processes: a one-process run would sample other responses
  (each process draws from its own RNG stream), and DDP's update equals one process's
  (tests/test_agg_ddp.py); every logged loss, KL and score (rel 1e-4, abs 1e-5) and the final
  weights (2e-5);
- the killed stage resumed from its checkpoint, its metrics read as one uninterrupted run, and
  it still meets the tolerances above: a resume that lost any optimizer moment, schedule or RNG
  state would miss them by orders of magnitude (each step moves weights by ~1e-3).

Launches are the cost (each starts 2 processes that import torch, transformers and the engine):
one DDP reference, then two per strategy (killed, resumed). The kills cover both loops: FSDP2 and
ZeRO-2 in PPO (two optimizers gathered whole; two DeepSpeed engines, each with its partition
files), ZeRO-3 in the reward model (the supervised loop; ZeRO partition files).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml

from align.rundir import read_metrics

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "accelerate"
TEMPLATE = "Q: {prompt}\nA: "
WEIGHT_TOL = 2e-5

SFT = {"data": {"max_length": 24},
       "train": {"max_steps": 6, "batch_size": 4, "grad_accum": 2, "lr": 3.0e-3, "warmup_steps": 2, "eval_every": 3,
                 "log_every": 1, "save_every": 3, "mixed_precision": "no"}}
RM = {"data": {"max_length": 24},
      "train": {"max_steps": 4, "batch_size": 4, "lr": 3.0e-3, "warmup_steps": 1, "eval_every": 2, "log_every": 1,
                "save_every": 2, "mixed_precision": "no"}}
RL = {"rollout_batch_size": 4, "mini_batch_size": 2, "micro_batch_size": 1, "response_length": 4,
      "total_episodes": 32, "lr": 1.0e-3, "eval_every": 2, "save_every": 2, "log_every": 1, "mixed_precision": "no"}
PPO = {**RL, "ppo_epochs": 2}
CRITIC = {"warmup_steps": 1}  # the actor holds still for the first step: under DeepSpeed its engine must not step
GRPO = {**RL, "n_samples_per_prompt": 2, "ppo_epochs": 1}
LORA = {"enabled": True, "r": 4, "alpha": 8, "target": "all"}
"""GRPO trains a LoRA actor everywhere (`memory_mode: lora`: the reference is the actor with its
adapter off); SFT and the reward model train LoRA where a strategy's `lora` says so (the reward
model's final model merged from the gathered weights)."""

# strategy -> (accelerate config file, recipe stages, kills: STAGE:STEP, one per killed launch,
#              the supervised stages trained with LoRA)
STRATEGIES = {
    "fsdp2": ("fsdp2_cpu_2proc.yaml", ("sft", "rm", "ppo", "grpo"), "ppo:3", ("sft",)),
    "zero2": ("deepspeed_zero2_cpu_2proc.yaml", ("sft", "rm", "ppo", "grpo"), "ppo:3", ("rm",)),
    "zero3": ("deepspeed_zero3_cpu_2proc.yaml", ("sft", "rm", "ppo", "grpo"), "rm:3", ("sft", "rm")),
}
SUPERVISED_KEYS = ("train/loss", "train/token_accuracy", "train/accuracy", "train/grad_norm", "val/loss",
                   "val/accuracy", "lr")
RL_KEYS = ("objective/kl", "objective/scores", "objective/entropy", "loss/policy_avg", "loss/value_avg",
           "policy/approxkl_avg", "eval/reward", "eval/gold_reward", "lr")


def launch(config_file: str, args: list[str], run_align: Callable[..., subprocess.CompletedProcess],
           ) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/FILE ARGS` (ARGS: `-m align ...` or a script)."""
    return run_align(*args, module_args=["-m", "accelerate.commands.launch", "--config_file",
                                         str(CONFIGS / config_file)])


def rl_section(data: dict[str, Path], sft: Path, rm: Path, ppo: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**extra, "model": {"path": str(sft)}, "reward": {"model": str(rm)},
            "data": {"train": str(data["prompts"]), "max_length": 24},
            "eval": {"prompts": str(data["eval"]), "max_samples": 4,
                     "gold_reward": "align.tasks.addition:gold_reward"},
            "ppo": ppo}


def write_recipe(path: Path, root: Path, stages: tuple[str, ...], model: Path, data: dict[str, Path],
                 refs: dict[str, Path], lora: tuple[str, ...] = ()) -> Path:
    """A recipe whose RL stages start from the one-process SFT and reward models (the references'
    inputs), so that they compare with the DDP reference whatever the sharded SFT ended with."""
    sections = {
        "sft": {**SFT, "model": {"path": str(model)},
                "data": {**SFT["data"], "train": str(data["sft_train"]), "validation": str(data["sft_val"])}},
        "rm": {**RM, "model": {"path": str(model)},
               "data": {**RM["data"], "train": str(data["pref_train"]), "validation": str(data["pref_val"])}},
        "ppo": rl_section(data, refs["sft"] / "model", refs["rm"] / "model", PPO, critic=CRITIC),
        "grpo": rl_section(data, refs["sft"] / "model", refs["rm"] / "model", GRPO, memory_mode="lora", lora=LORA),
    }
    for name in lora:
        sections[name]["lora"] = LORA
    recipe = {"output_root": str(root), "seed": 0, "prompt_template": TEMPLATE,
              **{name: sections[name] for name in stages}}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
               align_cli: Callable[..., subprocess.CompletedProcess]) -> dict[str, Any]:
    """The data, the one-process SFT and reward model (global batch as the sharded runs'), and
    PPO and GRPO from them under DDP in 2 processes."""
    from align.config import RMConfig, SFTConfig, build_config
    from align.rm import train_rm
    from align.sft import train_sft
    from align.tasks.addition import build

    root = tmp_path_factory.mktemp("sharded")
    data = build(root / "data", seed=0, n_digits=1, n_sft=240, n_pref=120, n_prompts=64, n_eval=10)
    # 9 validation examples: one process evaluates 5 (2 batches of 4), the other 4 (1 batch), so a
    # sharded evaluation must run an extra, uncounted batch to keep the processes in step.
    data["sft_val"] = root / "data" / "sft_val9.jsonl"
    data["sft_val"].write_text("".join((root / "data" / "sft_val.jsonl").read_text().splitlines(True)[:9]))
    refs = {"sft": root / "one" / "sft", "rm": root / "one" / "rm"}
    sft = {**SFT, "seed": 0, "output_dir": str(refs["sft"]), "model": {"path": str(tiny_model_dir)},
           "data": {**SFT["data"], "train": str(data["sft_train"]), "validation": str(data["sft_val"]),
                    "prompt_template": TEMPLATE},
           "train": {**SFT["train"], "batch_size": 8}}
    rm = {**RM, "seed": 0, "output_dir": str(refs["rm"]), "model": {"path": str(tiny_model_dir)},
          "data": {**RM["data"], "train": str(data["pref_train"]), "validation": str(data["pref_val"]),
                   "prompt_template": TEMPLATE},
          "train": {**RM["train"], "batch_size": 8}}
    train_sft(build_config(SFTConfig, sft))
    train_rm(build_config(RMConfig, rm))
    refs["sft_lora"], refs["rm_lora"] = root / "one" / "sft_lora", root / "one" / "rm_lora"
    train_sft(build_config(SFTConfig, {**sft, "output_dir": str(refs["sft_lora"]), "lora": LORA}))
    train_rm(build_config(RMConfig, {**rm, "output_dir": str(refs["rm_lora"]), "lora": LORA}))

    ddp_root = root / "ddp"
    recipe = write_recipe(root / "ddp.yaml", ddp_root, ("ppo", "grpo"), tiny_model_dir, data, refs)
    proc = launch("ddp_cpu_2proc.yaml", ["-m", "align", "run", str(recipe)], align_cli)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "data": data, "one": refs, "ddp": {"ppo": ddp_root / "ppo", "grpo": ddp_root / "grpo"}}


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """A model directory's weights: the full model's, or a LoRA adapter's."""
    from safetensors.torch import load_file

    adapter = model_dir / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.is_file() else model_dir / "model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Over the tensors both hold (a reward model shares its backbone's names with the causal LM)."""
    return max((a[k] - b[k]).abs().max().item() for k in a.keys() & b.keys())


def assert_same_run(run: Path, ref: Path, keys: tuple[str, ...], start: dict[str, torch.Tensor],
                    rel: float, abs_: float) -> None:
    """`run` against `ref`: the same metric rows (steps, no duplicates after a resume), the same
    values of `keys` within tolerance, the same steps, final weights within WEIGHT_TOL; and
    training moved the reference's weights away from `start`. Prints the worst differences
    (`pytest -s` shows them; docs/scaling.md quotes them)."""
    rows, ref_rows = read_metrics(run / "metrics.jsonl"), read_metrics(ref / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows], run
    compared, worst_share = 0, 0.0  # the largest |difference| / tolerance
    for a, b in zip(rows, ref_rows):
        for key in keys:
            if key in b:
                assert key in a, (run.name, a["step"], key)
                assert a[key] == pytest.approx(b[key], rel=rel, abs=abs_), (run.name, a["step"], key)
                compared += 1
                worst_share = max(worst_share, abs(a[key] - b[key]) / max(rel * abs(b[key]), abs_))
    assert compared >= len(ref_rows), f"{run.name}: too few metrics compared ({compared})"
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (run, ref))
    assert summary["steps"] == ref_summary["steps"]
    final, expected = weights(run / "model"), weights(ref / "model")
    assert final.keys() == expected.keys(), sorted(final.keys() ^ expected.keys())
    if (ref / "model" / "adapter_model.safetensors").is_file():  # peft starts every lora_B at 0
        assert max(v.abs().max().item() for k, v in expected.items() if "lora_B" in k) > 1e-4, ref
    else:
        assert max_difference(expected, start) > 1e-3, f"{ref.name}: training changed nothing"
    worst = max_difference(final, expected)
    print(f"\n{run.parent.name} {run.name}: {compared} logged values, the worst at {worst_share:.0%} of its "
          f"tolerance; final weights: worst absolute difference {worst:.1e}")
    assert worst < WEIGHT_TOL, f"{run.name}: weights differ from the reference by up to {worst:g}"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_sharded_run_matches_references_and_resumes(strategy: str, references: dict[str, Any], tiny_model_dir: Path,
                                                    align_cli: Callable[..., subprocess.CompletedProcess]) -> None:
    config_file, stages, kills, lora = STRATEGIES[strategy]
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    root = references["root"] / strategy
    recipe = write_recipe(references["root"] / f"{strategy}.yaml", root, stages, tiny_model_dir, references["data"],
                          references["one"], lora)
    args = [str(REPO / "tests" / "kill_in_stage.py"), str(root / "kills"), kills, "run", str(recipe)]

    # Killed once per kill (uncatchably, mid-stage, after a checkpoint); each relaunch resumes the
    # killed stage, and the last one finishes the recipe.
    killed = [tuple(item.split(":")) for item in kills.split(",")]
    procs = []
    for stage, step in killed:
        procs.append(launch(config_file, args, align_cli))
        assert procs[-1].returncode != 0 and (root / "kills" / f"{stage}-{step}").is_file(), procs[-1].stderr[-3000:]
        assert not (root / stage / "summary.json").exists() and (root / stage / "checkpoints" / "latest").is_file()
    procs.append(launch(config_file, args, align_cli))
    assert procs[-1].returncode == 0, procs[-1].stderr[-3000:]
    assert "Traceback" not in procs[-1].stderr, procs[-1].stderr[-3000:]
    for (stage, _), after in zip(killed, procs[1:]):
        assert f"{stage}: resumed from" in after.stdout, after.stdout[-3000:]

    init, sft_start = weights(tiny_model_dir), weights(references["one"]["sft"] / "model")
    for stage in stages:
        if stage in ("sft", "rm"):
            ref = references["one"][f"{stage}_lora" if stage in lora else stage]
            assert_same_run(root / stage, ref, SUPERVISED_KEYS, init, rel=1e-5, abs_=1e-6)
        else:
            assert_same_run(root / stage, references["ddp"][stage], RL_KEYS, sft_start, rel=1e-4, abs_=1e-5)

    # The sharded optimizer states went where the strategy keeps them: whole in trainer_state.pt
    # (FSDP2, gathered), one ZeRO partition file per process (DeepSpeed).
    # PPO's two engines under DeepSpeed: each optimizer has its own partitions.
    for stage, names in (("sft", ["optimizer"]), ("ppo", ["actor_opt", "critic_opt"])):
        checkpoint = sorted((root / stage / "checkpoints").glob("step-*"))[-1]
        partitions = sorted(p.name for p in checkpoint.glob("*-zero-rank*.pt"))
        assert partitions == ([f"{n}-zero-rank00{r}.pt" for n in names for r in (0, 1)]
                              if strategy.startswith("zero") else []), (stage, partitions)


def fake_accelerator(kind: str | None, zero_stage: int = 2) -> Any:
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    distributed = {"fsdp": DistributedType.FSDP, "deepspeed": DistributedType.DEEPSPEED,
                   None: DistributedType.MULTI_CPU}[kind]
    return SimpleNamespace(distributed_type=distributed,
                           state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage)))


@pytest.mark.parametrize("kind, stage, message", [
    ("deepspeed", 2, "critic.share_actor under DeepSpeed ZeRO-2"),
    ("deepspeed", 3, "critic.share_actor under DeepSpeed ZeRO-3"),
    ("fsdp", 2, "critic.share_actor under FSDP"),
])
def test_refusals_before_any_weight_loads(kind: str, stage: int, message: str) -> None:
    from align.errors import AlignError
    from align.sharding import check_supported

    with pytest.raises(AlignError, match=message) as info:
        check_supported(fake_accelerator(kind, stage), critic="shared")
    assert "\n" not in str(info.value)


def test_what_sharding_supports_passes() -> None:
    from align.sharding import check_supported

    check_supported(fake_accelerator("fsdp"), critic="separate")  # PPO under FSDP
    check_supported(fake_accelerator("deepspeed", 3), critic="separate")  # PPO under ZeRO-3
    check_supported(fake_accelerator("deepspeed", 3))  # SFT, RM, critic-free RL
    check_supported(fake_accelerator(None), critic="shared")  # DDP: anything


@pytest.mark.parametrize("env, message", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP1"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"}, "zero3_init_flag"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"},
     "gradient_accumulation_steps must be 1"),
])
def test_launch_settings_align_cannot_honour(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                             message: str) -> None:
    from align.errors import AlignError
    from align.sharding import check_launch

    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "FSDP_VERSION", "ACCELERATE_DEEPSPEED_ZERO3_INIT",
                "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(AlignError, match=message):
        check_launch()


def test_deepspeed_not_installed_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from align.errors import AlignError
    from align.sharding import check_launch

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "deepspeed" else find_spec(name, *args))
    with pytest.raises(AlignError, match=r"not installed: pip install -e '\.\[deepspeed\]'"):
        check_launch()


def test_every_config_file_parses_with_the_settings_align_needs() -> None:
    """The example files load with accelerate's own parser; the sharded ones keep what align
    requires (FSDP2, models loaded whole, DeepSpeed accumulation left to align)."""
    from accelerate.commands.config.config_args import load_config_from_file

    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_config_from_file(str(path))
        if cfg.distributed_type == "FSDP":
            assert cfg.fsdp_config["fsdp_version"] == 2 and not cfg.fsdp_config["fsdp_cpu_ram_efficient_loading"]
        if cfg.distributed_type == "DEEPSPEED":
            ds = cfg.deepspeed_config
            assert ds["gradient_accumulation_steps"] == 1 and not ds["zero3_init_flag"], path.name
            if ds["zero_stage"] == 3:
                assert ds["zero3_save_16bit_model"], path.name
