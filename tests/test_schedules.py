"""Learning-rate schedules: `train.lr_scheduler_type` / `ppo.lr_scheduler_type` through
`transformers.get_scheduler` (align/runtime.py `make_scheduler`), and each stage's default giving
exactly the learning rates the hand-written schedules gave before."""

from __future__ import annotations

import math
import typing
from pathlib import Path

import pytest
import torch

from align.config import (SCHEDULER_NAMES, TRACKER_NAMES, ConfigError, DPOStageConfig, OptimizerConfig,
                          PPOLoopConfig, SFTConfig, TrainConfig, build_config)
from align.errors import AlignError
from align.runtime import check_scheduler, make_scheduler


def lrs(o: OptimizerConfig, total: int) -> list[float]:
    """The learning rate of every optimizer step 0..total (the last one: after the run's last step)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=o.lr)
    sched = make_scheduler(opt, o, total)
    out = []
    for _ in range(total + 1):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def lambda_lrs(lr: float, factor: typing.Callable[[int], float], total: int) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    out = []
    for _ in range(total + 1):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


# The schedules as align wrote them by hand before get_scheduler (de6c211, align/runtime.py), kept
# here verbatim as the reference the defaults must reproduce.
def old_warmup_cosine(warmup: int, total: int, min_ratio: float) -> typing.Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def old_linear_decay(total: int) -> typing.Callable[[int], float]:
    return lambda step: max(0.0, 1.0 - step / total)


def test_names_agree_with_the_config_types_and_transformers() -> None:
    from transformers.trainer_utils import SchedulerType

    for cls in (TrainConfig, PPOLoopConfig):
        hints = typing.get_type_hints(cls)
        assert typing.get_args(hints["lr_scheduler_type"]) == SCHEDULER_NAMES
        assert typing.get_args(typing.get_args(hints["report_to"])[0]) == TRACKER_NAMES
    assert set(SCHEDULER_NAMES) - {"warmup_cosine"} <= {t.value for t in SchedulerType}
    assert {t.value for t in SchedulerType} - set(SCHEDULER_NAMES) == {"reduce_lr_on_plateau", "greedy"}


@pytest.mark.parametrize("warmup, total, min_ratio, lr", [
    (30, 1480, 0.0, 3e-4),  # the default recipe's SFT (recipes/addition.yaml)
    (10, 712, 0.0, 3e-4),   # and its reward model
    (10, 60, 0.1, 1e-3),    # recipes/sft_tiny.yaml's floor
    (0, 37, 0.0, 2e-5),     # TrainConfig's defaults
    (5, 23, 0.25, 1e-4),
])
def test_sft_and_rm_default_is_the_hand_written_schedule_exactly(warmup: int, total: int, min_ratio: float,
                                                                 lr: float) -> None:
    o = TrainConfig(lr=lr, warmup_steps=warmup, min_lr_ratio=min_ratio)
    assert o.lr_scheduler_type == "warmup_cosine"
    assert lrs(o, total) == lambda_lrs(lr, old_warmup_cosine(warmup, total, min_ratio), total)


@pytest.mark.parametrize("total", [16, 64, 8, 1])  # PPOLoopConfig's defaults (1024 / 64), the default recipe's
def test_rl_default_is_the_hand_written_linear_decay_exactly(total: int) -> None:
    o = PPOLoopConfig(lr=1e-4)
    assert o.lr_scheduler_type == "linear"
    assert lrs(o, total) == lambda_lrs(1e-4, old_linear_decay(total), total)


def test_rl_linear_decay_differs_from_the_old_one_by_float_rounding_only() -> None:
    """HF's linear is (N - s) / N (one rounding); the old one 1 - s / N rounded s / N first, an error
    of at most 2^-53 in the multiplier. Step counts that are powers of two (the defaults) agree to
    the bit; others may differ by lr x 2^-52 at most."""
    for total in (3, 7, 100, 125, 1000):
        new, old = lrs(PPOLoopConfig(lr=1e-4), total), lambda_lrs(1e-4, old_linear_decay(total), total)
        assert max(abs(a - b) for a, b in zip(new, old)) <= 1e-4 * 2**-52
        assert new != old or total == 1000


def test_dpo_default_is_hf_cosine_with_min_lr_as_before() -> None:
    """DPO always ran TRL's `cosine_with_min_lr` with `min_lr_rate = train.min_lr_ratio`."""
    from transformers import get_scheduler

    o = DPOStageConfig().train
    assert o.lr_scheduler_type == "cosine_with_min_lr"
    o = TrainConfig(lr=1e-4, warmup_steps=5, min_lr_ratio=0.1, lr_scheduler_type="cosine_with_min_lr")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-4)
    ref = get_scheduler("cosine_with_min_lr", opt, num_warmup_steps=5, num_training_steps=40,
                        scheduler_specific_kwargs={"min_lr_rate": 0.1})
    expected = []
    for _ in range(41):
        expected.append(ref.get_last_lr()[0])
        opt.step()
        ref.step()
    assert lrs(o, 40) == expected


@pytest.mark.parametrize("total, min_ratio", [(10, 0.0), (37, 0.1), (1000, 0.05)])
def test_warmup_cosine_without_warmup_is_hf_cosine_with_min_lr_bitwise(total: int, min_ratio: float) -> None:
    ours = TrainConfig(lr=3e-4, min_lr_ratio=min_ratio)
    hf = TrainConfig(lr=3e-4, min_lr_ratio=min_ratio, lr_scheduler_type="cosine_with_min_lr")
    assert lrs(ours, total) == lrs(hf, total)


@pytest.mark.parametrize("kind, warmup, kwargs, expected", [
    # hand-computed multipliers of lr for steps 0..4 of a 4-step run
    ("warmup_cosine", 2, {}, [1 / 2, 1, 1, 0.5, 0]),
    ("linear", 2, {}, [0, 0.5, 1, 0.5, 0]),
    ("cosine", 0, {}, [1, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0]),
    ("constant", 0, {}, [1, 1, 1, 1, 1]),
    ("constant_with_warmup", 2, {}, [0, 0.5, 1, 1, 1]),
    ("polynomial", 0, {"power": 2.0, "lr_end": 0.0}, [1, 0.5625, 0.25, 0.0625, 0]),
    ("cosine_with_min_lr", 0, {"min_lr_rate": 0.5}, [1, 0.5 + 0.25 * (1 + math.cos(math.pi / 4)), 0.75,
                                                     0.5 + 0.25 * (1 + math.cos(3 * math.pi / 4)), 0.5]),
])
def test_each_type_gives_its_hand_computed_learning_rates(kind: str, warmup: int, kwargs: dict,
                                                           expected: list[float]) -> None:
    o = TrainConfig(lr=1.0, lr_scheduler_type=kind, warmup_steps=warmup, lr_scheduler_kwargs=kwargs)
    assert lrs(o, 4) == pytest.approx(expected, abs=1e-12)


def test_warmup_ratio_rounds_up_as_hf_does() -> None:
    o = TrainConfig(lr=1.0, lr_scheduler_type="linear", warmup_ratio=0.25)
    assert o.warmup_for(10) == 3 and lrs(o, 10)[:4] == pytest.approx([0, 1 / 3, 2 / 3, 1])


def test_min_lr_ratio_is_the_floor_argument_of_the_type() -> None:
    o = TrainConfig(lr=1.0, lr_scheduler_type="warmup_stable_decay", min_lr_ratio=0.2,
                    lr_scheduler_kwargs={"num_decay_steps": 2})
    assert lrs(o, 4) == pytest.approx([1, 1, 1, 0.2 + 0.8 * 0.5, 0.2])


@pytest.mark.parametrize("section, message", [
    ({"lr_scheduler_type": "cosine_annealing"},
     "config key 'train.lr_scheduler_type' must be one of warmup_cosine, linear, cosine, cosine_with_min_lr, "
     "cosine_warmup_with_min_lr, cosine_with_restarts, polynomial, constant, constant_with_warmup, inverse_sqrt, "
     "warmup_stable_decay (got 'cosine_annealing')"),
    ({"lr_scheduler_type": "linear", "min_lr_ratio": 0.1}, "config key 'train.min_lr_ratio' applies to the schedules"),
    ({"lr_scheduler_kwargs": {"num_cycles": 2}}, "config key 'train.lr_scheduler_kwargs' must stay empty"),
    ({"lr_scheduler_type": "constant", "warmup_steps": 3}, "'constant' has no warmup"),
    ({"lr_scheduler_type": "cosine_with_min_lr", "min_lr_ratio": 0.1, "lr_scheduler_kwargs": {"min_lr": 1e-6}},
     "config key 'train.min_lr_ratio' and the floor in lr_scheduler_kwargs exclude each other"),
])
def test_impossible_schedules_are_one_line_config_errors(section: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_config(SFTConfig, {"output_dir": "o", "model": {"path": "m"}, "data": {"train": "d"}, "train": section})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_kwargs_that_do_not_fit_the_type_are_caught_before_training() -> None:
    o = TrainConfig(lr_scheduler_type="cosine", lr_scheduler_kwargs={"power": 2.0})
    with pytest.raises(ConfigError, match=r"config key 'ppo.lr_scheduler_kwargs' \(\{'power': 2.0\}\) does not fit "
                                          r"ppo.lr_scheduler_type 'cosine': .*power"):
        check_scheduler(o, 10, "ppo")
    with pytest.raises(ConfigError, match="lr_end"):  # polynomial's end must lie below every lr it decays
        check_scheduler(TrainConfig(lr=1e-8, lr_scheduler_type="polynomial"), 10, "train")
    with pytest.raises(AlignError, match=r"config key 'ppo.warmup_ratio' \(0.9: 5 steps\) must be shorter than the "
                                         r"run \(5 steps\)"):
        check_scheduler(PPOLoopConfig(warmup_ratio=0.9), 5, "ppo")


def test_dpo_refuses_align_own_schedule(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'warmup_cosine' is align's own schedule, which TRL's trainer does not run"):
        build_config(DPOStageConfig, {"output_dir": "o", "model": {"path": "m"}, "data": {"train": "d"},
                                      "train": {"lr_scheduler_type": "warmup_cosine"}})


def test_sft_trains_on_the_chosen_schedule(make_sft_config: typing.Callable[..., typing.Any], tmp_path: Path) -> None:
    """The `lr` column of a run is the schedule's (logged after each step: the next step's lr)."""
    from align.rundir import read_metrics
    from align.sft import train_sft

    over = {"train.max_steps": 6, "train.warmup_steps": 0, "train.warmup_ratio": 0.34, "train.log_every": 1,
            "train.lr_scheduler_type": "linear", "train.lr": 1e-3, "train.eval_every": 100, "train.report_to": []}
    cfg = make_sft_config(tmp_path / "run", over)
    train_sft(cfg)
    logged = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lr" in r]
    assert logged == lrs(cfg.train, 6)[1:]
    assert not (tmp_path / "run" / "tensorboard").exists()  # report_to: [] writes no tracker files
