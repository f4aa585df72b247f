"""One reward path: `shape_scores` on hand values, and the same raw scores through every method's
path (each online method's reward, best-of-n's choice) give the same training scores. Plus the
stage registry: the CLI and `align run` know every registered stage and nothing else."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.generation import Rollout
from align.reward import Reward, Shaping, shape_scores
from align.stages import STAGES, rl_stages, training_stages

REPO = Path(__file__).resolve().parents[1]


def test_shape_scores_applies_the_eos_penalty_then_the_overlong_penalty_then_the_clip() -> None:
    raw = torch.tensor([3.0, 3.0, -0.5, 0.2])
    has_eos = torch.tensor([True, False, False, True])
    lengths = torch.tensor([2, 8, 8, 7])
    assert torch.equal(shape_scores(raw, has_eos, lengths, Shaping()), raw)
    # penalty 1 on the rows without EOS, then clip to [-1, 1]: 3 -> 1; 3 - 1 = 2 -> 1; -1.5 -> -1; 0.2
    out = shape_scores(raw, has_eos, lengths, Shaping(missing_eos_penalty=1.0, clip=1.0))
    assert out.tolist() == pytest.approx([1.0, 1.0, -1.0, 0.2])
    # the order matters: clipping first would give 1 - 1 = 0 for row 1
    assert out[1] != 0.0
    # overlong (DAPO): budget 8, buffer 4: length 7 is 3 tokens into the buffer -> -3/4; 8 -> -1
    out = shape_scores(raw, has_eos, lengths, Shaping(overlong_buffer=4, overlong_penalty=1.0, max_length=8))
    assert out.tolist() == pytest.approx([3.0, 2.0, -1.5, 0.2 - 0.75])


def rollout_of(has_eos: list[bool], lengths: list[int]) -> Rollout:
    B, R = len(lengths), max(lengths)
    mask = torch.tensor([[1] * n + [0] * (R - n) for n in lengths])
    return Rollout(torch.ones(B, 2, dtype=torch.long), torch.ones(B, 2, dtype=torch.long),
                   torch.ones(B, R, dtype=torch.long), mask, torch.tensor(has_eos))


def test_every_method_and_best_of_n_see_the_same_training_scores(tokenizer, monkeypatch) -> None:
    """The reward of every online method is built by one function from its config (`from_ppo`):
    with the same `reward` section, the same raw scores become the same training scores whichever
    method is training; best-of-n keeps the candidate with the highest of those scores."""
    from align import best_of_n as B
    from align.config import build_config

    reward_section = {"function": "toy_rewards:char_sum", "missing_eos_penalty": 0.5, "clip": 300.0,
                      "overlong_buffer": 2}
    responses = ["ab", "zz", "a", "q"]
    rollout = rollout_of([True, False, True, False], [3, 4, 2, 4])
    got = {}
    for stage in rl_stages():
        cfg = build_config(stage.config, {"output_dir": "x", "model": {"path": "m"}, "data": {"train": "t"},
                                          "reward": reward_section, "ppo": {"response_length": 4}})
        reward = Reward.from_ppo(cfg, tokenizer, torch.device("cpu"))
        raw, shaped = reward.training_scores(["p"] * 4, responses, rollout, ["p"] * 4)
        got[stage.name] = shaped
    expected = shape_scores(torch.tensor([195.0, 244.0, 97.0, 113.0]), rollout.has_eos, rollout.response_mask.sum(1),
                            Shaping(missing_eos_penalty=0.5, clip=300.0, overlong_buffer=2, max_length=4))
    assert set(got) == {"ppo", "grpo", "dr_grpo", "rloo", "reinforce_pp", "remax"}
    for name, shaped in got.items():
        assert torch.equal(shaped, expected), name
    # best-of-n chooses by the same training score: "zz" has the highest raw score (244) but no EOS
    # and is overlong, so 244 - 0.5 - 1 = 242.5 still wins over "ab" (195); with a large penalty it loses.
    reward.shaping = Shaping(missing_eos_penalty=100.0)
    monkeypatch.setattr(B, "sample", lambda *a, **k: rollout)
    monkeypatch.setattr(B, "decode_responses", lambda tok, r: responses)
    prompts = [type("P", (), {"text": "p", "ids": [1]})()]
    result = B.best_of_n(None, tokenizer, prompts, reward, n=4, response_length=4)
    assert result.responses == ["ab"] and result.scores.tolist() == [195.0]


def test_the_cli_and_the_pipeline_know_every_registered_stage_and_nothing_else() -> None:
    out = subprocess.run([sys.executable, "-m", "align", "--help"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120).stdout
    listed = {line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.strip()}
    fixed = {"init-model", "task", "eval", "run", "compare", "generate", "sample", "export", "plan", "curate"}
    assert listed - fixed == {s.name for s in training_stages()}
    from align.pipeline import load_recipe
    from align.config import ConfigError

    names = [s.name for s in STAGES]
    assert names[:4] == ["task", "init_model", "sft", "rm"] and names[-1] == "eval"
    with pytest.raises(ConfigError, match="did you mean 'grpo'"):
        load_recipe(str(REPO / "recipes" / "addition.yaml"), ("output_root=/tmp/x", "grpoo.ppo.lr=1"))


def test_import_align_compare_pulls_no_torch() -> None:
    code = "import sys, align.compare, align.rundir, align.stages, align.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                   timeout=120)
