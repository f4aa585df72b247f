"""Hub-style datasets (issue 15): `data.dataset_config` (load_dataset's `name`), `data.split` /
`data.validation_split`, and `data.columns` mapping other column names onto align's fields, on
local datasets `datasets` reads the way it reads the hub's (no network): a dataset repo directory
with configurations in its README, a save_to_disk directory, a directory of parquet files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from align import data as D
from align.cli import main
from align.config import SFTConfig, load_config
from align.errors import AlignError, ConfigError, DataError

QA_TRAIN = [{"question": f"{a}+{b}=", "answer": str(a + b), "id": a * 10 + b} for a in range(4) for b in range(4)]
QA_TEST = [{"question": "7+1=", "answer": "8", "id": 71}, {"question": "9+0=", "answer": "9", "id": 90}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset repo as on the hub: two configurations, declared in README.md, with their splits."""
    root = tmp_path_factory.mktemp("hub") / "arith"
    write_jsonl(root / "qa" / "train.jsonl", QA_TRAIN)
    write_jsonl(root / "qa" / "test.jsonl", QA_TEST)
    write_jsonl(root / "chat" / "train.jsonl", [{"messages": [{"role": "user", "content": "1+1="},
                                                             {"role": "assistant", "content": "2"}]}])
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: qa\n  data_files:\n  - split: train\n    path: qa/train.jsonl\n"
        "  - split: test\n    path: qa/test.jsonl\n"
        "- config_name: chat\n  data_files:\n  - split: train\n    path: chat/train.jsonl\n---\n# arith\n")
    return root


COLUMNS = {"prompt": "question", "response": "answer"}


def test_dataset_config_split_and_columns_choose_and_rename(repo: Path) -> None:
    train = D.read_records(str(repo), "train", None, "qa", COLUMNS)
    assert [r.fields for r in train[:2]] == [{"id": 0, "prompt": "0+0=", "response": "0"},
                                             {"id": 1, "prompt": "0+1=", "response": "1"}]
    assert train[0].where == f"{repo}[qa/train][0]" and len(train) == len(QA_TRAIN)
    test = D.read_records(str(repo), "test", None, "qa", COLUMNS)
    assert [r.fields["prompt"] for r in test] == ["7+1=", "9+0="]
    chat = D.read_records(str(repo), "train", None, "chat")
    assert D.detect_format(chat) == "chat"
    # A column may take the name another one had: all renames happen at once.
    swapped = D.read_records(str(repo), "train", 1, "qa", {"prompt": "answer", "response": "question"})
    assert swapped[0].fields == {"id": 0, "prompt": "0", "response": "0+0="}


def test_missing_configs_splits_and_columns_are_one_line_errors(repo: Path) -> None:
    with pytest.raises(AlignError) as e:
        D.read_records(str(repo), "train", None, "nope")
    assert str(e.value) == (f"data directory '{repo}' does not load as a dataset with config 'nope' and split 'train' "
                            "(BuilderConfig 'nope' not found. Available: ['qa', 'chat'])")
    with pytest.raises(AlignError, match=r"with config 'chat' and split 'test' \(Unknown split \"test\""):
        D.read_records(str(repo), "test", None, "chat")
    with pytest.raises(AlignError) as e:
        D.read_records(str(repo), "train", None, "qa", {"prompt": "query", "response": "answer"})
    assert str(e.value) == (f"{repo}: column 'query' (config key 'data.columns.prompt') is not in the data; its "
                            "columns are question, answer, id")


def test_a_column_some_records_lack_is_reported_by_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "1+1=", "a": "2"}, {"q": "2+2="}, {"q": "3+3=", "a": "6"}])
    with pytest.raises(DataError) as e:
        D.read_records(str(path), columns={"prompt": "q", "response": "a"})
    assert e.value.problems == [f"{path}:2: column 'a' (config key 'data.columns.response') is missing"]


def test_llama_factory_columns_map_onto_alpaca(tmp_path: Path) -> None:
    """dataset_info.json's `columns` as LLaMA-Factory writes them: prompt/query/response are the
    instruction, input and output; a record without the query column has no input (optional)."""
    path = write_jsonl(tmp_path / "lf.jsonl", [{"instr": "Add.", "inp": "2 3", "out": "5"},
                                               {"instr": "Say 1.", "out": "1"}])
    records = D.read_records(str(path), columns={"prompt": "instr", "query": "inp", "response": "out"})
    assert [r.fields for r in records] == [{"instruction": "Add.", "input": "2 3", "output": "5"},
                                           {"instruction": "Say 1.", "output": "1"}]
    assert D.detect_format(records) == "alpaca"
    D.validate_records(records, "alpaca")


def test_save_to_disk_directories_and_parquet_directories(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(QA_TRAIN), "test": Dataset.from_list(QA_TEST)}).save_to_disk(
        str(tmp_path / "saved"))
    records = D.read_records(str(tmp_path / "saved"), "test", columns=COLUMNS)
    assert [r.fields["response"] for r in records] == ["8", "9"]
    assert records[0].where == f"{tmp_path / 'saved'}[test][0]"
    with pytest.raises(AlignError) as e:
        D.read_records(str(tmp_path / "saved"), "validation")
    assert str(e.value) == f"data directory '{tmp_path / 'saved'}' has no split 'validation' (its splits: train, test)"
    with pytest.raises(AlignError, match="'data.dataset_config' \\('qa'\\) does not apply to .*save_to_disk"):
        D.read_records(str(tmp_path / "saved"), "train", None, "qa")

    Dataset.from_list(QA_TEST).save_to_disk(str(tmp_path / "one"))  # a Dataset alone: no splits to choose
    assert len(D.read_records(str(tmp_path / "one"))) == 2

    (tmp_path / "pq" / "data").mkdir(parents=True)
    Dataset.from_list(QA_TRAIN).to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    Dataset.from_list(QA_TEST).to_parquet(str(tmp_path / "pq" / "data" / "test-00000-of-00001.parquet"))
    assert [r.fields["prompt"] for r in D.read_records(str(tmp_path / "pq"), "test", columns=COLUMNS)] == \
        ["7+1=", "9+0="]


def test_column_keys_are_checked_with_the_config(tmp_path: Path) -> None:
    base = {"output_dir": str(tmp_path / "o"), "model": {"path": "m"}, "data": {"train": "t"}}

    def problems(columns: dict[str, Any]) -> str:
        from align.config import build_config

        with pytest.raises(ConfigError) as e:
            build_config(SFTConfig, {**base, "data": {"train": "t", "columns": columns}})
        return str(e.value)

    assert problems({"history": "h"}).startswith("config key 'data.columns.history' is not a field align reads")
    assert problems({"prompt": ""}) == ("config key 'data.columns.prompt' must name a column (a non-empty string, "
                                        "got '')")
    for other in ({"chosen": "c", "rejected": "r"}, {"messages": "m"}, {"completion": "c"}):
        assert "config key 'data.columns.query' is LLaMA-Factory's alpaca input" in problems(
            {"prompt": "p", "query": "q", **other})


def test_trl_names_map_onto_the_data_section(repo: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    """A TRL-style flat config on a hub(-like) dataset with other column names; `align sft --dry-run`
    reads every record through the mapping (nothing trained)."""
    import yaml

    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny_model_dir), "output_dir": str(tmp_path / "run"), "dataset_name": str(repo),
        "dataset_config": "qa", "dataset_train_split": "train", "dataset_test_split": "test",
        "per_device_train_batch_size": 4, "max_steps": 2,
        "data": {"validation": str(repo), "columns": COLUMNS}}))
    cfg = load_config(SFTConfig, path, stage="sft")
    d = cfg.data
    assert (d.train, d.dataset_config, d.split, d.validation, d.validation_split) == (str(repo), "qa", "train",
                                                                                       str(repo), "test")
    result = CliRunner().invoke(main, ["sft", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"train: {len(QA_TRAIN)} examples" in result.stdout and "validation: 2 examples" in result.stdout
    assert load_config(SFTConfig, None, ["output_dir=o", "model.path=m", "data.train=t"]).data.dataset_config is None
    from align.hf_names import translate

    assert translate("grpo", {"dataset_config_name": "main"})[0] == {"data": {"dataset_config": "main"}}
    # TRL's test split is a split name, not a data source (it used to become data.validation: "test").
    assert translate("sft", {"dataset_test_split": "test"})[0] == {"data": {"validation_split": "test"}}


def test_prompt_sets_take_the_mapping_too(repo: Path, tokenizer: Any) -> None:
    prompts, report = D.load_prompts(str(repo), "auto", "Q: {prompt}\nA: ", tokenizer, 32, "drop", split="test",
                                     dataset_config="qa", columns={"prompt": "question"})
    assert [p.text for p in prompts] == ["7+1=", "9+0="] and report.kept == 2
