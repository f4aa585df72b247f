"""Bad config and bad data through the command line: one line `error: ...` on stderr naming the key
or file:line, exit code 2, no traceback, and nothing in the output directory that looks like a
finished model. Each case runs through click's CliRunner; the main ones also in a real process."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from click.testing import CliRunner

from align.cli import main


@dataclass
class Case:
    args: list[str]
    expected: list[str]
    """Substrings of the error line."""
    out: Path
    """The run's output_dir, which must not hold a model, summary or checkpoint afterwards."""


Builder = Callable[[Path, Callable[..., dict], Callable[[Path, dict], Path]], Case]


def jsonl(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


GOOD = json.dumps({"prompt": "1+1=", "response": "2"}).encode()


def config_case(overrides: dict[str, Any], expected: list[str], extra_args: tuple[str, ...] = ()) -> Builder:
    def build(tmp: Path, make: Callable[..., dict], write: Callable[[Path, dict], Path]) -> Case:
        data = make(tmp / "run")
        for dotted, value in overrides.items():
            section, key = dotted.split(".") if "." in dotted else (None, dotted)
            (data[section] if section else data)[key] = value
        return Case(["sft", str(write(tmp / "cfg.yaml", data)), *extra_args], expected, tmp / "run")
    return build


def data_case(lines: list[bytes] | None, expected: Callable[[Path], list[str]], name: str = "train.jsonl",
              overrides: dict[str, Any] | None = None) -> Builder:
    def build(tmp: Path, make: Callable[..., dict], write: Callable[[Path, dict], Path]) -> Case:
        path = tmp / name
        if lines is not None:
            jsonl(path, lines)
        data = make(tmp / "run", {"data.train": str(path), "data.validation": None, **(overrides or {})})
        return Case(["sft", str(write(tmp / "cfg.yaml", data))], expected(path), tmp / "run")
    return build


def bad_yaml(tmp: Path, make: Callable[..., dict], write: Callable[[Path, dict], Path]) -> Case:
    path = tmp / "cfg.yaml"
    path.write_text(f"output_dir: {tmp / 'run'}\ntrain:\n  lr: [1, 2\n  batch_size: 4\n", encoding="utf-8")
    return Case(["sft", str(path)], [f"{path}:", "invalid YAML"], tmp / "run")


def missing_config(tmp: Path, make: Callable[..., dict], write: Callable[[Path, dict], Path]) -> Case:
    return Case(["sft", str(tmp / "missing.yaml")], [f"'{tmp / 'missing.yaml'}' does not exist"], tmp / "run")


def missing_model(tmp: Path, make: Callable[..., dict], write: Callable[[Path, dict], Path]) -> Case:
    data = make(tmp / "run", {"model.path": str(tmp / "no-such-model")})
    return Case(["sft", str(write(tmp / "cfg.yaml", data))], [f"model path '{tmp / 'no-such-model'}' does not exist"],
                tmp / "run")


CASES: dict[str, Builder] = {
    "unknown_key": config_case({"train.lrr": 0.1}, ["'train.lrr'", "did you mean 'train.lr'"]),
    "unknown_top_key": config_case({"ouput_dir": "x"}, ["'ouput_dir'", "did you mean 'output_dir'"]),
    "bad_yaml": bad_yaml,
    "missing_config": missing_config,
    "bad_value": config_case({"train.lr": -0.5}, ["'train.lr' must be > 0"]),
    "wrong_type": config_case({"train.batch_size": "eight"}, ["'train.batch_size' must be int"]),
    "bad_literal": config_case({"data.truncation": "clip"}, ["'data.truncation' must be one of"]),
    "bad_set": config_case({}, ["'train.warmup_steps'", "train.max_steps"], ("--set", "train.warmup_steps=50")),
    "malformed_json_line": data_case([GOOD, GOOD, b'{"prompt": "1+2=", "response": 3'],
                                     lambda p: [f"{p}:3: invalid JSON"]),
    "missing_field": data_case([GOOD, json.dumps({"prompt": "1+3="}).encode(), GOOD],
                               lambda p: [f"{p}:2: missing field 'response'"]),
    "empty_file": data_case([], lambda p: [f"{p}: no records"]),
    "non_utf8": data_case([GOOD, b'{"prompt": "1+1=", "response": "\xff\xfe"}'],
                          lambda p: [f"{p}:2: not valid UTF-8"]),
    "missing_data_file": data_case(None, lambda p: [f"data file '{p}' does not exist"]),
    "template_field": data_case([GOOD, GOOD], lambda p: ["data.prompt_template", "{instruction}"],
                                overrides={"data.prompt_template": "{instruction}="}),
    "missing_model_path": missing_model,
}
IN_SUBPROCESS = ["unknown_key", "bad_yaml", "missing_config", "bad_value", "malformed_json_line", "missing_field",
                 "empty_file", "non_utf8", "missing_model_path"]


def check(case: Case, exit_code: int, stdout: str, stderr: str) -> None:
    assert exit_code == 2, f"exit {exit_code}\nstdout: {stdout}\nstderr: {stderr}"
    assert "Traceback" not in stdout + stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("error: ")
    for part in case.expected:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    for leftover in ("model", "summary.json", "checkpoints"):
        assert not (case.out / leftover).exists(), f"{leftover} written by a failed run"


@pytest.mark.parametrize("name", list(CASES))
def test_error_through_clirunner(name: str, tmp_path: Path, make_sft_dict: Callable[..., dict],
                                 yaml_writer: Callable[[Path, dict], Path]) -> None:
    case = CASES[name](tmp_path, make_sft_dict, yaml_writer)
    result = CliRunner().invoke(main, case.args)
    assert isinstance(result.exception, SystemExit), result.exception
    check(case, result.exit_code, result.stdout, result.stderr)


@pytest.fixture(scope="module")
def subprocess_results(tmp_path_factory: pytest.TempPathFactory, make_sft_dict: Callable[..., dict],
                       yaml_writer: Callable[[Path, dict], Path],
                       align_cli: Callable[..., Any]) -> dict[str, tuple[Case, Any]]:
    """Every IN_SUBPROCESS case as `python -m align ...`, two at a time (each spends ~3 s importing)."""
    cases = {name: CASES[name](tmp_path_factory.mktemp(name), make_sft_dict, yaml_writer) for name in IN_SUBPROCESS}
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = dict(zip(cases, pool.map(lambda c: align_cli(*c.args), cases.values())))
    return {name: (cases[name], procs[name]) for name in cases}


@pytest.mark.slow
@pytest.mark.parametrize("name", IN_SUBPROCESS)
def test_error_through_a_subprocess(name: str, subprocess_results: dict[str, tuple[Case, Any]]) -> None:
    case, proc = subprocess_results[name]
    check(case, proc.returncode, proc.stdout, proc.stderr)


def test_generate_with_a_missing_model_is_a_one_line_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["generate", str(tmp_path / "nope"), "--prompt", "1+1="])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: MODEL_PATH: model path '{tmp_path / 'nope'}' does not exist"
