"""`--dry-run`: every input checked, the plan printed (stages, models, data sizes, steps, batch,
expected checkpoint size), nothing trained and nothing written; bad input still exits with 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import yaml
from click.testing import CliRunner

from align.cli import main

TEMPLATE = "Q: {prompt}\nA: "


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def test_sft_dry_run_prints_the_plan_and_writes_nothing(make_sft_dict: Callable[..., dict], tmp_path: Path,
                                                        yaml_writer: Callable[[Path, dict], Path]) -> None:
    out = tmp_path / "deep" / "run"
    config = yaml_writer(tmp_path / "sft.yaml", make_sft_dict(out, {"train.max_steps": None, "train.epochs": 2}))
    result = invoke("sft", str(config), "--dry-run")
    assert result.exit_code == 0, result.output + result.stderr
    text = result.stdout
    assert text.startswith("sft: dry run: inputs checked; nothing trained, nothing written")
    for line in (f"output dir: {out}", "parameters: 49,568", "trained parameters: 49,568",
                 "train: 240 examples (0 truncated, 0 dropped as too long); validation: 24 examples",
                 "steps: 60", "global batch: 8", "checkpoint size: ~", "final model size: ~193.6 KiB"):
        assert line in text, line
    assert not (tmp_path / "deep").exists()


def test_dry_run_sizes_match_what_training_writes(make_sft_config: Callable[..., Any], tmp_path: Path) -> None:
    """The expected checkpoint size (weights + AdamW moments) is what a real checkpoint holds,
    give or take the trainer state's bookkeeping (RNG states, counters: some 50 KiB); the same for
    a LoRA adapter."""
    from align.sft import train_sft

    for name, extra in [("full", {}), ("lora", {"lora.enabled": True, "lora.r": 4})]:
        cfg = make_sft_config(tmp_path / name, {"train.max_steps": 3, "train.save_every": 1, **extra})
        plan = train_sft(cfg, dry_run=True)
        train_sft(cfg)
        ckpt = tmp_path / name / "checkpoints" / "step-0000001"
        weights = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
        state = (ckpt / "trainer_state.pt").stat().st_size
        assert abs(plan["checkpoint_bytes"] - (weights + state)) < 0.05 * (weights + state) + 64 * 2**10, name
        model = sum(p.stat().st_size for p in (tmp_path / name / "model").glob("*.safetensors"))
        assert abs(plan["final_model_bytes"] - model) < 0.05 * model + 8 * 2**10, name  # + the safetensors header


def test_dry_run_on_bad_data_exits_2(make_sft_dict: Callable[..., dict], tmp_path: Path,
                                     yaml_writer: Callable[[Path, dict], Path]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "response": "2"}\n{"prompt": "1+1="}\n')
    config = yaml_writer(tmp_path / "sft.yaml", make_sft_dict(tmp_path / "run", {"data.train": str(bad)}))
    result = invoke("sft", str(config), "--dry-run")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {bad}:2: missing field 'response'"
    assert not (tmp_path / "run").exists()


def test_rm_and_ppo_dry_runs(tiny_model_dir: Path, tmp_path: Path) -> None:
    """PPO's plan names the four models; a reward model with another vocabulary is noted (it
    scores through text) and the critic must then start from the SFT model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from align.modeling import init_tiny_model

    def reward_model(model: Path, out: Path) -> Path:  # a score head on the model, as `align rm` saves one
        AutoModelForSequenceClassification.from_pretrained(model, num_labels=1).save_pretrained(out)
        AutoTokenizer.from_pretrained(model).save_pretrained(out)
        return out

    other = reward_model(init_tiny_model(tmp_path / "other-vocab", hidden=32, layers=1, heads=4, max_position=64,
                                         vocab_size=290, corpus=["1+1=2 2+2=4 3+3=6"] * 10), tmp_path / "other-rm")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{i}?", "chosen": "a", "rejected": "b"}) + "\n" for i in range(20)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+1="}) + "\n" for i in range(16)))
    rm = tmp_path / "rm.yaml"
    rm.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "rm"), "model": {"path": str(tiny_model_dir)},
                                  "data": {"train": str(pairs), "max_length": 16},
                                  "train": {"max_steps": 3, "batch_size": 4}}))
    result = invoke("rm", str(rm), "--dry-run")
    assert result.exit_code == 0, result.output + result.stderr
    assert "rm: dry run" in result.stdout and "steps: 3" in result.stdout and "train: 19 pairs" in result.stdout

    ppo = tmp_path / "ppo.yaml"
    ppo.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "ppo"), "model": {"path": str(tiny_model_dir)},
                                   "reward": {"model": str(other)}, "critic": {"path": str(tiny_model_dir)},
                                   "data": {"train": str(prompts), "max_length": 16},
                                   "ppo": {"total_episodes": 32, "rollout_batch_size": 8, "mini_batch_size": 8,
                                           "micro_batch_size": 8}}))
    result = invoke("ppo", str(ppo), "--dry-run")
    assert result.exit_code == 0, result.output + result.stderr
    out = result.stdout
    assert out.splitlines()[0] == ("ppo: note: the reward model's tokenizer differs from the actor's; responses are "
                                   "decoded and re-tokenized for it (text bridge)")
    for line in (f"actor: {tiny_model_dir} (full mode)", f"reference: {tiny_model_dir} (a frozen copy)",
                 "reward: " + str(other) + " (different vocabulary: scored through text)", "steps: 4",
                 "episodes per step: 8", "16 prompts (0 dropped"):
        assert line in out, line
    result = invoke("ppo", str(ppo), "--dry-run", "--set", "memory_mode=lora",
                    "--set", f"reward.model={reward_model(tiny_model_dir, tmp_path / 'same-vocab-rm')}")
    assert "reference: the actor with its adapter disabled" in result.stdout and "note:" not in result.stdout
    assert not (tmp_path / "rm").exists() and not (tmp_path / "ppo").exists()


def test_run_dry_run_checks_what_exists_and_names_what_earlier_stages_produce(
        tiny_model_dir: Path, addition_data: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "pipeline"
    recipe = {"output_root": str(root), "prompt_template": TEMPLATE,
              "sft": {"model": {"path": str(tiny_model_dir)},
                      "data": {"train": str(addition_data["sft_train"]), "validation": str(addition_data["sft_val"]),
                               "max_length": 24}, "train": {"max_steps": 5, "batch_size": 8}},
              "rm": {"data": {"train": str(tmp_path / "pairs.jsonl")}, "train": {"max_steps": 2}},
              "eval": {"prompts": str(addition_data["eval"])}}
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = invoke("run", str(path), "--dry-run")
    assert result.exit_code == 0, result.output + result.stderr
    out = result.stdout
    assert "sft: dry run: inputs checked" in out and "steps: 5" in out
    assert "rm: inputs produced by sft" in out and "eval: inputs produced by sft" in out
    assert not root.exists()

    # what a later stage reads and already exists is checked, line by line
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "2"}\n')
    result = invoke("run", str(path), "--dry-run")
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: stage rm: {tmp_path / 'pairs.jsonl'}:1: 'chosen' and 'rejected' are "
                                     "identical (the pair teaches nothing)")
    assert not root.exists()
