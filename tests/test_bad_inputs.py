"""A catalogue of bad inputs to every command (sft, rm, ppo, run, eval), one test case each.

Every case asserts the error contract of align/errors.py: exit code 2, no traceback, one line on
stderr, `error: ...`, naming the place at fault (file:line or config key), and nothing in the
output directory that looks finished (no `model/`, `summary.json`, `results.json`, checkpoints).
Most cases fail before any weight is loaded; the few that can only fail while training (a reward
function misbehaving at step 1) are marked `late`: their stderr also holds the progress bar, and
the error is its last line.

Cases run in-process through click's CliRunner; a handful also as `python -m align` subprocesses.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from click.testing import CliRunner

from align.cli import main
from align.config import set_dotted

TESTS = Path(__file__).resolve().parent
TEMPLATE = "Q: {prompt}\nA: "


def jsonl(path: Path, rows: list[Any]) -> Path:
    """Write rows (dicts as JSON, bytes and str as they are) one per line."""
    lines = [r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode() for r in rows]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def reward_model_from(model: Path, out: Path) -> Path:
    """A reward model (a sequence classifier with a score head) on `model`'s backbone, as `align rm` saves one."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    AutoModelForSequenceClassification.from_pretrained(model, num_labels=1).save_pretrained(out)
    AutoTokenizer.from_pretrained(model).save_pretrained(out)
    return out


def model_copy(model: Path, out: Path, weights: Callable[[bytes], bytes] | None = None,
               tensors: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Path:
    """A copy of `model` whose model.safetensors is rewritten: its bytes by `weights`, or its tensors by `tensors`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out)
    file = out / "model.safetensors"
    if weights is not None:
        file.write_bytes(weights(file.read_bytes()))
    if tensors is not None:
        save_file(tensors(load_file(file)), file, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """Good data files, and model directories that are broken in one way each."""
    import torch

    from align.modeling import init_tiny_model

    root = tmp_path_factory.mktemp("bad-inputs")
    no_config = root / "no-config"
    no_config.mkdir()
    shutil.copy(tiny_model_dir / "model.safetensors", no_config)
    no_weights = root / "no-weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, no_weights)
    # a run directory whose config.yaml was damaged after the run (its model is fine)
    damaged_run = root / "damaged-run"
    shutil.copytree(tiny_model_dir, damaged_run / "model")
    (damaged_run / "config.yaml").write_text("seed: 0\ndata:\n  prompt_template: [unclosed\n")
    (damaged_run / "summary.json").write_text("{}")
    other_vocab = init_tiny_model(root / "other-vocab", hidden=32, layers=1, heads=4, max_position=64,
                                  vocab_size=300, corpus=["1+1=2 2+2=4 3+3=6 hello world"] * 20)
    return {
        "sft": jsonl(root / "sft.jsonl", [{"prompt": f"{a}+{b}=", "response": str(a + b)}
                                          for a in range(5) for b in range(5)]),
        "pref": jsonl(root / "pref.jsonl", [{"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": str(a)}
                                            for a in range(20)]),
        "prompts": jsonl(root / "prompts.jsonl", [{"prompt": f"{a}+{b}="} for a in range(4) for b in range(4)]),
        "no_config": no_config, "no_weights": no_weights, "damaged_run": damaged_run,
        # another vocabulary: 40 BPE merges on top of the bytes
        "other_vocab": other_vocab, "other_vocab_rm": reward_model_from(other_vocab, root / "other-vocab-rm"),
        # weights files that are cut, hold some of the model's tensors, or none of them
        "truncated_weights": model_copy(tiny_model_dir, root / "truncated", weights=lambda b: b[:len(b) // 2]),
        "partial_weights": model_copy(tiny_model_dir, root / "partial",
                                      tensors=lambda t: {k: v for k, v in t.items() if ".layers.1." not in k}),
        "foreign_weights": model_copy(tiny_model_dir, root / "foreign", tensors=lambda t: {"w": torch.zeros(2)}),
    }


@dataclass
class Case:
    args: list[str]
    expected: list[str]
    """Substrings of the error line (the place: file:line or config key; and the problem)."""
    outputs: list[Path] = field(default_factory=list)
    """Directories that must not hold anything that looks finished afterwards."""
    late: bool = False
    """The error can only show during training (after the progress bar started)."""


class Env:
    """One case's directory, the module's inputs, and config writers for each command."""

    def __init__(self, tmp: Path, model: Path, inputs: dict[str, Path]):
        self.tmp, self.model, self.inputs = tmp, model, inputs
        self.out = tmp / "run"

    def file(self, name: str, rows: list[Any]) -> Path:
        return jsonl(self.tmp / name, rows)

    def base(self, kind: str) -> dict[str, Any]:
        train = {"max_steps": 2, "batch_size": 4, "mixed_precision": "no", "log_every": 1, "eval_every": 100}
        common = {"output_dir": str(self.out), "seed": 0, "model": {"path": str(self.model)}}
        if kind == "sft":
            return {**common, "data": {"train": str(self.inputs["sft"]), "val_fraction": 0.0,
                                       "prompt_template": TEMPLATE, "max_length": 24}, "train": train}
        if kind == "rm":
            return {**common, "data": {"train": str(self.inputs["pref"]), "val_fraction": 0.0,
                                       "prompt_template": TEMPLATE, "max_length": 24}, "train": train}
        if kind == "ppo":
            return {**common, "reward": {"function": "toy_rewards:fraction_of_sevens"},
                    "data": {"train": str(self.inputs["prompts"]), "prompt_template": TEMPLATE, "max_length": 16},
                    "ppo": {"total_episodes": 8, "rollout_batch_size": 8, "mini_batch_size": 8, "micro_batch_size": 8,
                            "ppo_epochs": 1, "response_length": 4, "mixed_precision": "no", "eval_every": 1000,
                            "sample_every": 1000, "save_every": 1000}}
        if kind == "eval":
            return {"output_dir": str(self.out), "models": [str(self.model)], "prompts": str(self.inputs["prompts"]),
                    "prompt_template": TEMPLATE, "response_length": 4}
        if kind == "run":
            return {"output_root": str(self.out), "prompt_template": TEMPLATE,
                    "sft": {"model": {"path": str(self.model)}, "data": {"train": str(self.inputs["sft"]),
                            "val_fraction": 0.0, "max_length": 24}, "train": train}}
        raise ValueError(kind)

    def config(self, kind: str, overrides: dict[str, Any] | None = None, text: str | bytes | None = None) -> Path:
        """Write the base config of `kind` with dotted `overrides` (or the raw `text`) and return its path."""
        path = self.tmp / f"{kind}.yaml"
        if text is not None:
            path.write_bytes(text if isinstance(text, bytes) else text.encode())
            return path
        data = self.base(kind)
        for key, value in (overrides or {}).items():
            set_dotted(data, key, value)
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    def command(self, kind: str, overrides: dict[str, Any] | None = None, expected: list[str] = (), *,
                late: bool = False, extra: tuple[str, ...] = ()) -> Case:
        args = ["eval", "-c"] if kind == "eval" else [kind]
        return Case([*args, str(self.config(kind, overrides)), *extra], list(expected), [self.out], late)


def data_case(kind: str, rows: list[Any], expected: Callable[[Path], list[str]], key: str = "data.train",
              **overrides: Any) -> Callable[[Env], Case]:
    """A case whose data file (`key`) holds `rows`; `expected(path)` gives the substrings."""
    def build(env: Env) -> Case:
        path = env.file("data.jsonl", rows)
        return env.command(kind, {key: str(path), **{k.replace("__", "."): v for k, v in overrides.items()}},
                           expected(path))
    return build


def context_case(kind: str, rows: list[Any], expected: Callable[[Path], list[str]]) -> Callable[[Env], Case]:
    """A data case on a model with 64 positions (`other_vocab`), data.max_length far above that."""
    def build(env: Env) -> Case:
        path = env.file("data.jsonl", rows)
        return env.command(kind, {"data.train": str(path), "model.path": str(env.inputs["other_vocab"]),
                                  "data.max_length": 512}, expected(path))
    return build


def config_case(kind: str, overrides: dict[str, Any], expected: list[str], **kw: Any) -> Callable[[Env], Case]:
    return lambda env: env.command(kind, overrides, expected, **kw)


def model_case(kind: str, name: str, expected: Callable[[Path], list[str]], key: str = "model.path",
               extra: tuple[str, ...] = ()) -> Callable[[Env], Case]:
    """A case whose model (`key`) is the module input `name`; `expected(path)` gives the substrings."""
    return lambda env: env.command(kind, {key: str(env.inputs[name])}, expected(env.inputs[name]), extra=extra)


def yaml_case(text: Callable[[str], str], expected: Callable[[Path, str], list[str]]) -> Callable[[Env], Case]:
    """An SFT config whose YAML is the good one's, rewritten by `text`."""
    def build(env: Env) -> Case:
        good = env.config("sft").read_text()
        path = env.config("sft", text=text(good))
        return Case(["sft", str(path)], expected(path, path.read_text()), [env.out])
    return build


def line_of(text: str, start: str, nth: int = 1) -> int:
    """The line number of the `nth` line of `text` starting with `start`."""
    return [i for i, line in enumerate(text.splitlines(), 1) if line.startswith(start)][nth - 1]


# 9 levels of 9 aliases: 342 bytes that expand to 9**9 (387 million) strings
ALIAS_BOMB = '\n'.join(['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'] + [
    f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")]) + "\n"


def generate_case(*options: str, expected: list[str], model: str | None = None) -> Callable[[Env], Case]:
    """`align generate MODEL --prompt ...` with `options` (the tiny model, or the module input `model`)."""
    return lambda env: Case(["generate", str(env.inputs[model] if model else env.model), *options], expected)


def init_model_case(*options: str, expected: list[str]) -> Callable[[Env], Case]:
    return lambda env: Case(["init-model", str(env.tmp / "init"), *options], expected, [env.tmp / "init"])


def results_case(change: Callable[[dict[str, Any]], None], expected: list[str]) -> Callable[[Env], Case]:
    """`align compare` on a results.json as `align eval` writes it, then changed by `change`."""
    def build(env: Env) -> Case:
        out = env.tmp / "eval"
        (out / "responses").mkdir(parents=True)
        jsonl(out / "responses" / "sft.jsonl", [{"prompt": "1+1=", "response": "2", "reward": 0.5}])
        results = {"prompts": "p.jsonl", "n_prompts": 1, "baseline": "sft", "has_reward": True, "has_gold": False,
                   "models": [{"name": "sft", "path": "runs/sft", "metrics": {"reward": 0.5, "response_length": 2.0},
                               "compute": {"wall_time_sec": 1.0, "tokens": 10, "stages": ["sft"]},
                               "responses": "responses/sft.jsonl"}]}
        change(results)
        (out / "results.json").write_text(json.dumps(results))
        return Case(["compare", str(out), "--out", str(env.tmp / "report")],
                    [str(out / "results.json"), *expected], [env.tmp / "report"])
    return build


def task_case(build_first: dict[str, Any] | None, args: list[str], expected: list[str]) -> Callable[[Env], Case]:
    """`align task addition DIR ARGS` where DIR already holds a file, or (`build_first`) a built task."""
    def build(env: Env) -> Case:
        out = env.tmp / "data"
        if build_first is None:
            out.mkdir()
            (out / "notes.txt").write_text("mine")
        else:
            from align.tasks.addition import build as build_task

            build_task(out, **build_first)
        return Case(["task", "addition", str(out), *args], expected)
    return build


SMALL_TASK = {"n_sft": 8, "n_pref": 8, "n_prompts": 8, "n_eval": 4}
SMALL_TASK_ARGS = [arg for k, v in SMALL_TASK.items() for arg in ("--size", f"{k}={v}")]


OK = {"prompt": "1+1=", "response": "2"}
PAIR = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
LONG = {"prompt": "1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1=", "response": "16"}
PAST_CONTEXT = "zq" * 40  # 80 unmerged bytes: past a 64-position model

CASES: dict[str, Callable[[Env], Case]] = {
    # ---- config files and --set
    "unknown_top_level_key": config_case("sft", {"ouput_dir": "x"}, ["'ouput_dir'", "did you mean 'output_dir'"]),
    "unknown_nested_key": config_case("sft", {"train.lrr": 0.1}, ["'train.lrr'", "did you mean 'train.lr'"]),
    "yaml_is_a_list": lambda env: Case(["sft", str(env.config("sft", text="- output_dir: x\n- seed: 1\n"))],
                                       [f"{env.tmp / 'sft.yaml'}: a config file must be a mapping"]),
    "invalid_yaml": lambda env: Case(["sft", str(env.config("sft", text="seed: 1\ntrain:\n  lr: [1, 2\n"))],
                                     [f"{env.tmp / 'sft.yaml'}:", "invalid YAML"]),
    "config_not_utf8": lambda env: Case(["sft", str(env.config("sft", text=b"seed: 1\nname: \xff\xfe\n"))],
                                        [f"{env.tmp / 'sft.yaml'}: not UTF-8"]),
    "missing_config_file": lambda env: Case(["sft", str(env.tmp / "nope.yaml")],
                                            [f"'{env.tmp / 'nope.yaml'}' does not exist"]),
    "set_without_equals": config_case("sft", {}, ["--set takes key=value", "'train.lr'"], extra=("--set", "train.lr")),
    "set_unknown_key": config_case("sft", {}, ["'train.lrr'"], extra=("--set", "train.lrr=1")),
    "lr_out_of_range": config_case("sft", {"train.lr": -0.5}, ["config key 'train.lr' must be > 0"]),
    "wrong_type": config_case("sft", {"train.batch_size": "eight"}, ["config key 'train.batch_size' must be int"]),
    "bad_choice": config_case("sft", {"data.truncation": "clip"}, ["config key 'data.truncation' must be one of"]),
    "lora_rank_zero": config_case("sft", {"lora.enabled": True, "lora.r": 0}, ["config key 'lora.r' must be >= 1"]),
    "val_fraction_out_of_range": config_case("sft", {"data.val_fraction": 1.5}, ["config key 'data.val_fraction'"]),
    "warmup_longer_than_the_run": config_case("sft", {"train.max_steps": None, "train.warmup_steps": 50},
                                              ["config key 'train.warmup_steps' (50)", "6 steps"]),
    "fewer_examples_than_a_batch": config_case("sft", {"train.batch_size": 64},
                                               ["only 25 training examples", "train.batch_size"]),
    "output_dir_is_a_file": lambda env: env.command("sft", {"output_dir": str(env.file("taken", ["x"]))},
                                                    ["output_dir", "not writable"]),
    # ---- models and tokenizers
    "missing_model_key": config_case("sft", {"model.path": ""}, ["missing required config key 'model.path'"]),
    "missing_model_path": lambda env: env.command("sft", {"model.path": str(env.tmp / "nope")},
                                                  ["config key 'model.path'", f"'{env.tmp / 'nope'}' does not exist"]),
    "model_dir_without_config": lambda env: env.command("sft", {"model.path": str(env.inputs["no_config"])},
                                                        ["config key 'model.path'", "no config.json"]),
    "model_dir_without_weights": lambda env: env.command("sft", {"model.path": str(env.inputs["no_weights"])},
                                                         ["config key 'model.path'", "holds no weights"]),
    "missing_tokenizer_path": lambda env: env.command("sft", {"model.tokenizer": str(env.tmp / "tok")},
                                                      ["config key 'model.tokenizer'", "does not exist"]),
    # ---- SFT data
    "malformed_json_line": data_case("sft", [OK, OK, b'{"prompt": "1+2=", "response": 3'],
                                     lambda p: [f"{p}:3: invalid JSON"]),
    "line_not_an_object": data_case("sft", [OK, [1, 2], OK], lambda p: [f"{p}:2: expected a JSON object, got list"]),
    "missing_field": data_case("sft", [OK, {"prompt": "1+3="}, OK], lambda p: [f"{p}:2: missing field 'response'"]),
    "misspelt_field": data_case("sft", [OK, {"prompt": "1+3=", "respone": "4"}],
                                lambda p: [f"{p}:2: missing field 'response' (found 'respone'"]),
    "wrong_field_type": data_case("sft", [OK, {"prompt": "1+3=", "response": 4}],
                                  lambda p: [f"{p}:2: field 'response' must be a string, got int"]),
    "empty_response": data_case("sft", [OK, {"prompt": "1+3=", "response": "  "}],
                                lambda p: [f"{p}:2: field 'response' is empty"]),
    "invalid_json_before_field_problems": data_case(  # lines that are not JSON are reported before field checks
        "sft", [OK, {"prompt": "1+3="}, OK, {"prompt": "2+2=", "response": ""}, b"{oops", OK],
        lambda p: [f"{p}:5: invalid JSON"]),
    "several_field_problems_together": data_case(
        "sft", [OK, {"prompt": "1+3="}, OK, {"prompt": "2+2=", "response": ""}, {"prompt": 5, "response": "5"}],
        lambda p: [f"{p}:2: missing field 'response'", f"{p}:4: field 'response' is empty",
                   f"{p}:5: field 'prompt' must be a string"]),
    "empty_file": data_case("sft", [], lambda p: [f"{p}: no records"]),
    "non_utf8_bytes": data_case("sft", [OK, b'{"prompt": "1+1=", "response": "\xff\xfe"}'],
                                lambda p: [f"{p}:2: not valid UTF-8"]),
    "missing_data_file": lambda env: env.command("sft", {"data.train": str(env.tmp / "none.jsonl")},
                                                 [f"data file '{env.tmp / 'none.jsonl'}' does not exist"]),
    "sft_example_longer_than_max_length": data_case(
        "sft", [OK, LONG, OK, LONG], lambda p: [f"{p}:2: example is", f"{p}:4: example is", "data.max_length (16)"],
        data__max_length=16, data__truncation="error"),
    "sft_example_longer_than_the_context": context_case(
        "sft", [OK, {"prompt": PAST_CONTEXT, "response": "1"}],
        lambda p: [f"{p}:2: example is", "longer than the model's context (64 positions)", "data.max_length to 64"]),
    "template_field_missing": data_case("sft", [OK, OK],
                                        lambda p: ["config key 'data.prompt_template'", "{instruction}"],
                                        data__prompt_template="{instruction}="),
    "chat_without_assistant_turn": data_case(
        "sft", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                {"messages": [{"role": "user", "content": "hi"}]}],
        lambda p: [f"{p}:2: conversation has no assistant turn"]),
    "preference_data_to_sft": data_case("sft", [PAIR, PAIR], lambda p: [f"{p}:1: SFT needs prompt/response records"]),
    "validation_file_in_another_format": lambda env: env.command(
        "sft", {"data.validation": str(env.inputs["pref"])}, [f"{env.inputs['pref']}:1: missing field 'response'"]),
    # ---- reward model data
    "sft_data_to_rm": data_case("rm", [OK, OK], lambda p: [f"{p}:1: the reward model needs preference pairs"]),
    "chosen_equals_rejected": data_case("rm", [PAIR, {"prompt": "2+2=", "chosen": "4", "rejected": "4"}],
                                        lambda p: [f"{p}:2: 'chosen' and 'rejected' are identical"]),
    "missing_rejected": data_case("rm", [PAIR, {"prompt": "2+2=", "chosen": "4"}],
                                  lambda p: [f"{p}:2: missing field 'rejected'"]),
    "rm_pair_longer_than_max_length": data_case(
        "rm", [PAIR, {"prompt": LONG["prompt"], "chosen": "16", "rejected": "15"}],
        lambda p: [f"{p}:2: example is", "data.max_length (16)"], data__max_length=16, data__truncation="error"),
    "rm_pair_longer_than_the_context": context_case(
        "rm", [PAIR, {"prompt": PAST_CONTEXT, "chosen": "1", "rejected": "2"}],
        lambda p: [f"{p}:2: example is", "longer than the model's context (64 positions)"]),
    "normalize_with_missing": lambda env: env.command("rm", {"normalize_with": str(env.tmp / "n.jsonl")},
                                                      ["config key 'normalize_with'", "does not exist"]),
    # checked before training, although it is only read after it
    "normalize_with_malformed": data_case("rm", [OK, b"{nope"], lambda p: [f"{p}:2: invalid JSON"],
                                          key="normalize_with"),
    # ---- PPO
    "reward_function_raises": config_case("ppo", {"reward.function": "toy_rewards:raises"},
                                          ["reward function toy_rewards:raises raised RuntimeError: boom"], late=True),
    "reward_function_wrong_count": config_case(
        "ppo", {"reward.function": "toy_rewards:wrong_count"},
        ["toy_rewards:wrong_count returned 9 scores for 8 responses"], late=True),
    "reward_function_nan": config_case("ppo", {"reward.function": "toy_rewards:nan_scores"},
                                       ["toy_rewards:nan_scores returned a non-finite score"], late=True),
    "reward_function_not_importable": config_case(
        "ppo", {"reward.function": "no_such_module:score"},
        ["config key 'reward.function'", "cannot import 'no_such_module:score'"]),
    "reward_function_missing_attribute": config_case("ppo", {"reward.function": "toy_rewards:nope"},
                                                     ["config key 'reward.function'", "cannot import"]),
    "reward_function_bad_spec": config_case("ppo", {"reward.function": "toy_rewards.fraction_of_sevens"},
                                            ["config key 'reward.function' must be 'module:function'"]),
    "reward_model_and_function": lambda env: env.command(
        "ppo", {"reward.model": str(env.model)}, ["exactly one of config keys 'reward.model' and 'reward.function'"]),
    "reward_model_missing": lambda env: env.command(
        "ppo", {"reward.function": None, "reward.model": str(env.tmp / "rm")},
        ["config key 'reward.model'", "does not exist"]),
    "critic_vocabulary_differs": lambda env: env.command(
        "ppo", {"reward.function": None, "reward.model": str(env.inputs["other_vocab_rm"])},
        ["config key 'reward.model': the critic would start from", "vocabulary differs", "critic.path"]),
    "ppo_prompt_longer_than_max_length": data_case(
        "ppo", [{"prompt": "1+1="}] * 8 + [{"prompt": LONG["prompt"]}] * 8,
        lambda p: [f"{p}:9: prompt is", f"{p}:16: prompt is", "data.max_length (12)"],
        data__max_length=12, data__truncation="error"),
    "ppo_prompt_and_response_past_the_context": context_case(
        "ppo", [{"prompt": "1+1="}] * 8 + [{"prompt": "zq" * 30}],
        lambda p: [f"{p}:9: prompt is", "with 4 response tokens it runs past the model's context (64 positions)"]),
    "eval_prompts_malformed": data_case("ppo", [{"prompt": "1+1="}, b"{x"], lambda p: [f"{p}:2: invalid JSON"],
                                        key="eval.prompts"),
    "gold_reward_not_importable": config_case("ppo", {"eval.gold_reward": "toy_rewards:gold"},
                                              ["config key 'eval.gold_reward'", "cannot import"]),
    "mini_batch_not_dividing": config_case("ppo", {"ppo.mini_batch_size": 3},
                                           ["config key 'ppo.mini_batch_size' must divide ppo.rollout_batch_size"]),
    "fewer_prompts_than_a_rollout_batch": config_case(
        "ppo", {"ppo.rollout_batch_size": 32, "ppo.mini_batch_size": 32, "ppo.micro_batch_size": 32,
                "ppo.total_episodes": 32}, ["16 prompts", "ppo.rollout_batch_size"]),
    "ppo_unknown_nested_key": config_case("ppo", {"ppo.kl_coeff": 0.1},
                                          ["'ppo.kl_coeff'", "did you mean 'ppo.kl_coef'"]),
    # ---- align run
    "recipe_without_stages": lambda env: Case(
        ["run", str(env.config("run", text=f"output_root: {env.out}\nseed: 1\n"))], ["has no stage section"]),
    "recipe_unknown_stage": config_case("run", {"sfft": {"train": {"lr": 0.1}}}, ["'sfft'", "did you mean 'sft'"]),
    "recipe_unknown_nested_key": config_case("run", {"sft.train.lrr": 0.1},
                                             ["'sft.train.lrr'", "did you mean 'sft.train.lr'"]),
    "recipe_without_output_root": config_case("run", {"output_root": ""}, ["'output_root'"]),
    "recipe_from_unknown_stage": config_case("run", {}, ["--from ppo", "sft"], extra=("--from", "ppo")),
    # a late stage's bad file is reported before the first stage trains
    "recipe_later_stage_bad_data": lambda env: Case(
        ["run", str(env.config("run", {"ppo": {"reward": {"function": "toy_rewards:fraction_of_sevens"},
                                              "data": {"train": str(env.file("p.jsonl", [{"prompt": "1="}, b"{"]))},
                                              "ppo": env.base("ppo")["ppo"]}}))],
        ["stage ppo:", f"{env.tmp / 'p.jsonl'}:2: invalid JSON"], [env.out / "sft", env.out / "ppo"]),
    # ---- align eval
    "eval_without_models": config_case("eval", {"models": []}, ["missing required config key 'models'"]),
    "eval_duplicate_names": lambda env: env.command("eval", {"models": [str(env.model), str(env.model)]},
                                                    [f"'{env.model.name}' appears twice", "'names'"]),
    "eval_names_count": lambda env: env.command("eval", {"models": [str(env.model), str(env.model)], "names": ["a"]},
                                                ["config key 'names' has 1 names for 2 models"]),
    "eval_missing_model": lambda env: env.command("eval", {"models": [str(env.model), str(env.tmp / "m")],
                                                           "names": ["a", "b"]},
                                                  ["config key 'models[1]'", "does not exist"]),
    "eval_validation_malformed": data_case("eval", [OK, b"{"], lambda p: [f"{p}:2: invalid JSON"], key="validation"),
    "eval_gold_not_importable": config_case("eval", {"gold_reward": "nowhere:gold"}, ["config key 'gold_reward'"]),
    # ---- weights that would load as random values (checked: missing, foreign, cut files; no score head)
    "weights_missing_some_tensors": model_case(
        "sft", "partial_weights", lambda p: [f"could not load model '{p}'", "lack 9 of the model's",
                                             "model.layers.1.", "random values"]),
    "weights_of_another_model": model_case(
        "sft", "foreign_weights", lambda p: [f"could not load model '{p}'", "lack 21 of the model's 21 tensors",
                                             "another architecture"]),
    "truncated_safetensors": model_case(
        "sft", "truncated_weights", lambda p: ["config key 'model.path'", f"'{p / 'model.safetensors'}' is damaged "
                                               "or truncated", "re-download"]),
    "truncated_safetensors_in_a_dry_run": model_case(  # --dry-run opens every weight file's header
        "rm", "truncated_weights", lambda p: ["config key 'model.path'", "is damaged or truncated"],
        extra=("--dry-run",)),
    "reward_model_without_a_score_head": lambda env: env.command(  # an SFT run given as the reward model
        "ppo", {"reward.function": None, "reward.model": str(env.model)},
        ["config key 'reward.model'", "has no score head (it is a LlamaForCausalLM, not a reward model)"]),
    "eval_reward_model_without_a_score_head": lambda env: env.command(
        "eval", {"reward_model": str(env.model)}, ["config key 'reward_model'", "has no score head"]),
    # ---- model paths that look local but do not exist: not a failed hub download
    "mistyped_relative_model_path": config_case(
        "sft", {"model.path": "./no-such-runs/sfft"}, ["config key 'model.path'",
                                                       "model path './no-such-runs/sfft' does not exist"]),
    "model_path_ending_in_a_separator": config_case(
        "sft", {"model.path": "no-such-runs/"}, ["model path 'no-such-runs/' does not exist"]),
    "model_path_of_several_parts": config_case(
        "rm", {"model.path": "no/such/run"}, ["model path 'no/such/run' does not exist"]),
    # ---- chat data
    "chat_opening_with_the_assistant": data_case(
        "sft", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                {"messages": [{"role": "system", "content": "be brief"}, {"role": "assistant", "content": "yo"},
                              {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}],
        lambda p: [f"{p}:2: messages[1] opens the conversation with an assistant turn"]),
    "chat_empty_assistant_turn": data_case(
        "sft", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}],
        lambda p: [f"{p}:2: messages[1] is an empty assistant turn"]),
    "deeply_nested_json": data_case("sft", [OK, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"],
                                    lambda p: [f"{p}:2: JSON nested too deeply"]),
    "lone_surrogate_in_text": data_case("sft", [OK, b'{"prompt": "1+1=", "response": "2\\ud800"}'],
                                        lambda p: [f"{p}:2: field 'response' holds a lone UTF-16 surrogate"]),
    "lone_surrogate_in_a_chat_turn": data_case(
        "sft", [{"messages": [{"role": "user", "content": "hi\udc00"}, {"role": "assistant", "content": "yo"}]}],
        lambda p: [f"{p}:1: field 'messages[0].content' holds a lone UTF-16 surrogate"]),
    # ---- YAML that safe_load would take silently
    "yaml_duplicate_section": yaml_case(
        lambda good: good + "train:\n  lr: 0.1\n",
        lambda p, text: [f"{p}:{line_of(text, 'train:', 2)}: duplicate key 'train' "
                         f"(first at line {line_of(text, 'train:')})"]),
    "yaml_duplicate_nested_key": yaml_case(
        lambda good: good.replace("  max_steps: 2\n", "  max_steps: 2\n  max_steps: 3\n"),
        lambda p, text: [f"{p}:{line_of(text, '  max_steps:', 2)}: duplicate key 'max_steps'"]),
    "yaml_alias_bomb": yaml_case(lambda good: ALIAS_BOMB,
                                 lambda p, text: [f"{p}: expands to more than 100,000 nodes (YAML aliases)"]),
    # ---- align eval: names and run directories
    "eval_name_with_a_slash": config_case("eval", {"names": ["../../escaped"]}, ["config key 'names[0]'",
                                                                                 "contains a path separator"]),
    "eval_name_dot_dot": config_case("eval", {"names": [".."]}, ["config key 'names[0]' ('..') contains '..'"]),
    "eval_name_empty": lambda env: env.command("eval", {"models": [str(env.model), str(env.model)], "names": ["a", ""]},
                                               ["config key 'names[1]' ('') is empty"]),
    "eval_damaged_run_config": lambda env: env.command(
        "eval", {"models": [str(env.inputs["damaged_run"])]},
        [f"{env.inputs['damaged_run'] / 'config.yaml'}:", "invalid YAML", "repair it"]),
    # ---- align generate
    "generate_zero_new_tokens": generate_case("--prompt", "1+1=", "--max-new-tokens", "0",
                                              expected=["--max-new-tokens must be >= 1 (got 0)"]),
    "generate_negative_new_tokens": generate_case("--prompt", "1+1=", "--max-new-tokens", "-3",
                                                  expected=["--max-new-tokens must be >= 1 (got -3)"]),
    "generate_empty_prompt": generate_case("--prompt", "1+1=", "--prompt", "",
                                           expected=["--prompt #2: the prompt is empty after templating"]),
    "generate_prompt_past_the_context": generate_case(
        "--prompt", "9" * 60, "--max-new-tokens", "8",
        expected=["--prompt: the prompt is 60 tokens; with --max-new-tokens 8 it runs past the model's context "
                  "(64 positions)", "lower --max-new-tokens to 4"]),
    "generate_prompt_longer_than_the_context": generate_case(
        "--prompt", "9" * 70, expected=["the prompt is 70 tokens, as long as or longer than the model's context"]),
    "generate_damaged_run_config": generate_case(
        "--prompt", "1+1=", model="damaged_run",
        expected=["damaged-run/config.yaml:", "invalid YAML", "give the template with --template"]),
    "generate_truncated_weights": generate_case("--prompt", "1+1=", model="truncated_weights",
                                                expected=["MODEL_PATH:", "is damaged or truncated"]),
    "generate_mistyped_path": lambda env: Case(["generate", "./no-such-runs/sfft", "--prompt", "1+1="],
                                               ["MODEL_PATH: model path './no-such-runs/sfft' does not exist"]),
    # ---- align init-model
    "init_model_zero_hidden": init_model_case("--hidden", "0", expected=["--hidden must be >= 1 (got 0)"]),
    "init_model_negative_layers": init_model_case("--layers", "-1", expected=["--layers must be >= 1 (got -1)"]),
    "init_model_heads_not_dividing_hidden": init_model_case(
        "--hidden", "30", "--heads", "4", expected=["--hidden (30) must be divisible by --heads (4)"]),
    "init_model_odd_head_size": init_model_case("--hidden", "36", "--heads", "4",
                                                expected=["--hidden / --heads (36 / 4 = 9) must be even"]),
    "init_model_vocabulary_below_the_bytes": init_model_case(
        "--vocab-size", "100", expected=["--vocab-size must be >= 260", "(got 100)"]),
    "init_model_zero_positions": init_model_case("--max-position", "0", expected=["--max-position must be >= 1"]),
    # ---- align task
    "task_into_a_non_empty_directory": task_case(None, [], ["is not empty (it holds no task.json"]),
    "task_over_another_seed": task_case({"seed": 0, **SMALL_TASK}, ["--seed", "1", *SMALL_TASK_ARGS],
                                        ["is not empty (it holds task addition with seed 0, not 1)"]),
    "task_over_other_parameters": task_case({"seed": 0, **SMALL_TASK}, [*SMALL_TASK_ARGS, "--size", "p_forget=0.1"],
                                            ["p_forget=0.6 (asked 0.1)"]),
    "task_unknown_parameter": task_case(None, ["--size", "n_sfft=8"], ["--size n_sfft: the task has no parameter"]),
    # ---- align compare: a results.json of the wrong shape
    "compare_metric_is_a_string": results_case(lambda r: r["models"][0]["metrics"].update(reward="0.5"),
                                               ["key 'models[0].metrics.reward' must be a number, got str"]),
    "compare_metric_is_a_list": results_case(lambda r: r["models"][0]["metrics"].update(response_length=[2]),
                                             ["key 'models[0].metrics.response_length' must be a number, got list"]),
    "compare_models_not_a_list": results_case(lambda r: r.update(models={"sft": r["models"][0]}),
                                              ["key 'models' must be a list, got dict"]),
    "compare_stages_not_a_list": results_case(lambda r: r["models"][0]["compute"].update(stages="sft"),
                                              ["key 'models[0].compute.stages' must be a list of strings"]),
}
# (test_cli_errors.py runs nine SFT config and data cases in subprocesses already)
IN_SUBPROCESS = ["reward_function_raises", "sft_data_to_rm", "recipe_later_stage_bad_data"]


def check(case: Case, exit_code: int, stdout: str, stderr: str) -> None:
    assert exit_code == 2, f"exit {exit_code}\nstdout: {stdout[-2000:]}\nstderr: {stderr[-2000:]}"
    assert "Traceback" not in stdout + stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one error line, last, got:\n{stderr}"
    if not case.late:
        assert len(lines) == 1, f"expected only the error line on stderr, got:\n{stderr}"
    for part in case.expected:
        assert part in errors[0], f"{part!r} not in {errors[0]!r}"
    for out in case.outputs:
        for leftover in ("model", "summary.json", "results.json", "checkpoints", "config.json", "report.md",
                         "report.html"):
            assert not (out / leftover).exists(), f"{out / leftover} written by a failed run"


def test_the_catalogue_is_large() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, tmp_path: Path, tiny_model_dir: Path, inputs: dict[str, Path]) -> None:
    case = CASES[name](Env(tmp_path, tiny_model_dir, inputs))
    result = CliRunner().invoke(main, case.args)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    check(case, result.exit_code, result.stdout, result.stderr)


@pytest.fixture(scope="module")
def subprocess_results(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, inputs: dict[str, Path],
                       align_cli: Callable[..., Any]) -> dict[str, tuple[Case, Any]]:
    """The IN_SUBPROCESS cases as `python -m align ...` (run from tests/, so `toy_rewards` imports), two at a time."""
    cases = {n: CASES[n](Env(tmp_path_factory.mktemp(n), tiny_model_dir, inputs)) for n in IN_SUBPROCESS}
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = dict(zip(cases, pool.map(lambda c: align_cli(*c.args, cwd=TESTS), cases.values())))
    return {n: (cases[n], procs[n]) for n in cases}


@pytest.mark.slow
@pytest.mark.parametrize("name", IN_SUBPROCESS)
def test_bad_input_in_a_subprocess(name: str, subprocess_results: dict[str, tuple[Case, Any]]) -> None:
    case, proc = subprocess_results[name]
    check(case, proc.returncode, proc.stdout, proc.stderr)


def test_several_problems_of_one_file_are_reported_together_up_to_a_limit(tmp_path: Path, tiny_model_dir: Path,
                                                                          inputs: dict[str, Path]) -> None:
    env = Env(tmp_path, tiny_model_dir, inputs)
    path = env.file("d.jsonl", [OK] + [{"prompt": f"{i}="} for i in range(14)])
    result = CliRunner().invoke(main, env.command("sft", {"data.train": str(path)}).args)
    (line,) = result.stderr.strip().splitlines()
    assert [f"{path}:{i}: missing field 'response'" in line for i in range(2, 12)] == [True] * 10
    assert f"{path}:12:" not in line and line.endswith("(and 4 more)")


def test_a_tokenizer_without_a_pad_token_gets_its_own(tmp_path: Path, tiny_model_dir: Path,
                                                      inputs: dict[str, Path]) -> None:
    """Not an error: align pads with an unused token of the vocabulary (here the tokenizer's own
    [PAD], no longer declared as pad), never EOS, so the embeddings keep their size. Adding a
    token when none is unused is covered in test_hf_interop.py."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tmp_path / "no-pad"
    shutil.copytree(tiny_model_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.pad_token = None
    tok.save_pretrained(model)
    assert AutoTokenizer.from_pretrained(model).pad_token_id is None
    env = Env(tmp_path, model, inputs)
    result = CliRunner().invoke(main, env.command("sft", {}).args)
    assert result.exit_code == 0, result.output + result.stderr
    saved = AutoTokenizer.from_pretrained(env.out / "model")
    assert saved.pad_token == "[PAD]" and saved.pad_token_id != saved.eos_token_id
    trained = AutoModelForCausalLM.from_pretrained(env.out / "model")
    assert trained.get_input_embeddings().num_embeddings == len(saved) == len(tok)
