"""Data: reading every file type, the loss mask of every format (token by token, by decoding what
is trained on), Chinese text, templates, truncation, the validation split, padding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from align import data as D
from align.errors import AlignError, DataError
from align.ops import masked_nll

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n"


def rec(**fields: Any) -> D.Record:
    return D.Record("test.jsonl:1", fields)


def ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def tokenize_one(tokenizer: Any, record: D.Record, template: str = "{prompt}", fmt: str = "auto") -> D.Example:
    fmt = D.detect_format([record], fmt)
    D.validate_records([record], fmt)
    examples, report = D.tokenize_sft([record], fmt, template, tokenizer, max_length=256, truncation="error")
    assert report.kept == 1
    return examples[0]


def trained_runs(ex: D.Example) -> list[list[int]]:
    """The ids under each contiguous run of loss_mask == 1."""
    runs, current = [], []
    for token, m in zip(ex.input_ids, ex.loss_mask):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def assert_prompt_then_response(tokenizer: Any, ex: D.Example, prompt: str, response: str) -> None:
    """ids = prompt + response + EOS, with the mask exactly on response + EOS, token by token."""
    p, r = ids(tokenizer, prompt), ids(tokenizer, response)
    assert ex.input_ids == p + r + [tokenizer.eos_token_id]
    assert ex.loss_mask == [0] * len(p) + [1] * (len(r) + 1)
    trained = [t for t, m in zip(ex.input_ids, ex.loss_mask) if m]
    assert tokenizer.decode(trained) == response + tokenizer.eos_token
    untrained = [t for t, m in zip(ex.input_ids, ex.loss_mask) if not m]
    assert tokenizer.decode(untrained) == prompt


# ----------------------------------------------------------------------------------------------
# The loss mask of each format


def test_tiny_tokenizer_adds_no_bos_and_pads_with_its_own_token(tokenizer: Any) -> None:
    # The expectations below rely on this: no BOS prefix, and pad distinct from EOS.
    assert D.bos_prefix(tokenizer) == []
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_mask_prompt_response(tokenizer: Any) -> None:
    ex = tokenize_one(tokenizer, rec(prompt="12+34=", response="46"), "Q: {prompt}\nA: ")
    assert_prompt_then_response(tokenizer, ex, "Q: 12+34=\nA: ", "46")


def test_mask_prompt_completion(tokenizer: Any) -> None:
    ex = tokenize_one(tokenizer, rec(prompt="The sky is", completion=" blue."))
    assert_prompt_then_response(tokenizer, ex, "The sky is", " blue.")


def test_mask_alpaca_with_input_fills_instruction_and_input(tokenizer: Any) -> None:
    record = rec(instruction="Add the numbers.", input="12+34", output="46")
    ex = tokenize_one(tokenizer, record, ALPACA_TEMPLATE)
    assert_prompt_then_response(tokenizer, ex, "### Instruction:\nAdd the numbers.\n### Input:\n12+34\n### Response:\n", "46")
    # with the plain {prompt} template the input follows the instruction after a blank line
    ex = tokenize_one(tokenizer, record, "{prompt} => ")
    assert_prompt_then_response(tokenizer, ex, "Add the numbers.\n\n12+34 => ", "46")


@pytest.mark.parametrize("record", [
    rec(instruction="Say hi.", output="hi"),
    rec(instruction="Say hi.", input="", output="hi"),
    rec(instruction="Say hi.", input=None, output="hi"),
])
def test_mask_alpaca_without_input(tokenizer: Any, record: D.Record) -> None:
    ex = tokenize_one(tokenizer, record, "User: {instruction}\nAssistant: ", fmt="alpaca")
    assert_prompt_then_response(tokenizer, ex, "User: Say hi.\nAssistant: ", "hi")


def test_mask_chat_two_assistant_turns(tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
                {"role": "assistant", "content": "2"}, {"role": "user", "content": "and 2+2?"},
                {"role": "assistant", "content": "4, easy"}]
    ex = tokenize_one(tokenizer, rec(messages=messages))
    # the ids are the tokenizer's own chat rendering, nothing added or lost
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert ex.input_ids == ids(tokenizer, full)
    eos = tokenizer.eos_token
    # exactly the two assistant turns are trained on, each with the EOS that closes it
    runs = trained_runs(ex)
    assert [tokenizer.decode(r) for r in runs] == ["2" + eos, "4, easy" + eos]
    assert [r[-1] for r in runs] == [tokenizer.eos_token_id] * 2
    untrained = tokenizer.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if not m])
    assert untrained == "<|system|>\nBe brief.\n<|user|>\n1+1?\n<|assistant|>\n<|user|>\nand 2+2?\n<|assistant|>\n"


def test_chat_without_assistant_turn_is_an_error(tokenizer: Any) -> None:
    with pytest.raises(AlignError, match="no assistant turn"):
        tokenize_one(tokenizer, rec(messages=[{"role": "user", "content": "hi"}]))


def test_chat_template_refusal_is_a_one_line_error_naming_the_record() -> None:
    from architectures import FAMILIES, build_tokenizer

    gemma = build_tokenizer(FAMILIES["gemma2"], "present")  # its template raises on a system turn
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
                {"role": "assistant", "content": "2"}]
    with pytest.raises(DataError) as info:
        tokenize_one(gemma, rec(messages=messages))
    assert str(info.value) == "test.jsonl:1: the tokenizer's chat template refuses this conversation: " \
                              "System role not supported"


# ----------------------------------------------------------------------------------------------
# The token that closes an assistant turn, read from the chat template

PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
"""A template whose turns end in plain text, no special token."""


@pytest.mark.parametrize("family,end", [("gemma2", "<end_of_turn>"), ("llama", "<|eot_id|>"), ("qwen2", "<|im_end|>"),
                                        ("qwen3", "<|im_end|>"), ("phi3", "<|end|>")])
def test_turn_end_token_is_read_from_the_template(family: str, end: str) -> None:
    """Gemma and Phi-3 close a turn with a token other than EOS; Llama 3 and ChatML with EOS itself."""
    from architectures import FAMILIES, build_tokenizer

    tok = build_tokenizer(FAMILIES[family], FAMILIES[family].pad)
    assert D.turn_end_token(tok) == end
    assert (end == tok.eos_token) == (family in ("llama", "qwen2", "qwen3"))


def test_turn_end_token_of_the_tiny_template_is_eos(tokenizer: Any) -> None:
    assert D.turn_end_token(tokenizer) == tokenizer.eos_token  # TINY_CHAT_TEMPLATE closes turns with {{ eos_token }}


def test_turn_end_token_is_none_without_a_special_turn_end() -> None:
    from architectures import FAMILIES, build_tokenizer

    tok = build_tokenizer(FAMILIES["llama"], "missing")
    tok.chat_template = PLAIN_TEMPLATE
    assert D.turn_end_token(tok) is None
    assert D.turn_end_token(build_tokenizer(FAMILIES["mistral"], "missing")) is None  # no chat template at all


def test_turn_end_token_needs_no_eos() -> None:
    from architectures import FAMILIES, build_tokenizer

    tok = build_tokenizer(FAMILIES["gemma2"], "present")
    tok.eos_token = None
    assert tok.eos_token_id is None and D.turn_end_token(tok) == "<end_of_turn>"


def test_turn_end_token_tries_a_system_turn_and_says_when_nothing_renders() -> None:
    from architectures import FAMILIES, build_tokenizer

    tok = build_tokenizer(FAMILIES["qwen2"], "present")
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system turn comes first') }}"
                         "{% endif %}" + tok.chat_template)
    assert D.turn_end_token(tok) == "<|im_end|>"
    tok.chat_template = "{{ raise_exception('no conversation suits me') }}"
    with pytest.raises(AlignError) as info:
        D.turn_end_token(tok)
    assert "cannot tell which token ends an assistant turn" in str(info.value)
    assert "no conversation suits me" in str(info.value) and "\n" not in str(info.value)


def test_chinese_round_trips_through_file_tokenizer_and_mask(tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "zh.jsonl"
    path.write_text(json.dumps({"prompt": "1加1等于几?", "response": "1加1等于2。"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    (record,) = D.read_records(str(path))
    assert record.fields == {"prompt": "1加1等于几?", "response": "1加1等于2。"}
    assert tokenizer.decode(ids(tokenizer, "1加1等于几?")) == "1加1等于几?"
    ex = tokenize_one(tokenizer, record, "问:{prompt}\n答:")
    assert_prompt_then_response(tokenizer, ex, "问:1加1等于几?\n答:", "1加1等于2。")
    assert tokenizer.decode(ex.input_ids, skip_special_tokens=True) == "问:1加1等于几?\n答:1加1等于2。"


def test_padding_is_never_trained_on(tokenizer: Any) -> None:
    short = tokenize_one(tokenizer, rec(prompt="1+1=", response="2"))
    long = tokenize_one(tokenizer, rec(prompt="10+20=", response="30 exactly"))
    batch = D.pad_examples([short, long], tokenizer.pad_token_id)
    n_short, width = len(short.input_ids), len(long.input_ids)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    assert batch["attention_mask"].tolist() == [[1] * n_short + [0] * (width - n_short), [1] * width]
    assert batch["input_ids"][0, n_short:].eq(tokenizer.pad_token_id).all()
    for row, ex in enumerate([short, long]):
        expected = [t if m else D.IGNORE_INDEX for t, m in zip(ex.input_ids, ex.loss_mask)]
        expected += [D.IGNORE_INDEX] * (width - len(ex.input_ids))
        assert batch["labels"][row].tolist() == expected
    # the EOS that ends the short response is trained on, although padding follows it
    assert batch["labels"][0, n_short - 1].item() == tokenizer.eos_token_id


def test_masked_nll_is_unchanged_by_extra_padding_and_by_left_padding(tiny_model_dir: Path, tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    examples = [tokenize_one(tokenizer, rec(prompt=p, response=r), "Q: {prompt}\nA: ")
                for p, r in [("12+34=", "46"), ("1+2=", "3"), ("7+8=", "15 and some more words")]]
    b = D.pad_examples(examples, tokenizer.pad_token_id)
    pad_id = tokenizer.pad_token_id

    def loss(input_ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor, **kw: Any) -> float:
        with torch.no_grad():
            return masked_nll(model(input_ids=input_ids, attention_mask=attention, **kw).logits, labels).item()

    reference = loss(b["input_ids"], b["attention_mask"], b["labels"])
    extra = 7
    wider = loss(torch.cat([b["input_ids"], torch.full((3, extra), pad_id)], 1),
                 torch.cat([b["attention_mask"], torch.zeros(3, extra, dtype=torch.long)], 1),
                 torch.cat([b["labels"], torch.full((3, extra), D.IGNORE_INDEX)], 1))
    assert wider == pytest.approx(reference, abs=1e-5)

    # the same rows left-padded, with position ids counted from each row's first real token
    width = b["input_ids"].shape[1]
    left_ids = torch.full_like(b["input_ids"], pad_id)
    left_attn, left_labels = torch.zeros_like(left_ids), torch.full_like(left_ids, D.IGNORE_INDEX)
    for i, n in enumerate(b["attention_mask"].sum(1).tolist()):
        left_ids[i, width - n:], left_attn[i, width - n:] = b["input_ids"][i, :n], 1
        left_labels[i, width - n:] = b["labels"][i, :n]
    positions = (left_attn.cumsum(1) - 1).clamp(min=0)
    assert loss(left_ids, left_attn, left_labels, position_ids=positions) == pytest.approx(reference, abs=1e-5)
    # and the loss does see the response: shuffling the labels changes it
    assert loss(b["input_ids"], b["attention_mask"], b["labels"].roll(1, dims=1)) != pytest.approx(reference, abs=1e-3)


# ----------------------------------------------------------------------------------------------
# Templates and formats


def test_template_with_a_field_the_record_lacks_is_an_error(tokenizer: Any) -> None:
    with pytest.raises(AlignError, match=r"data.prompt_template.*\{instruction\}"):
        tokenize_one(tokenizer, rec(prompt="1+1=", response="2"), "{instruction}: ")
    with pytest.raises(AlignError, match="data.prompt_template"):
        tokenize_one(tokenizer, rec(prompt="1+1=", response="2"), "{prompt")


@pytest.mark.parametrize(("fields", "fmt"), [
    ({"instruction": "i", "input": "x", "output": "o"}, "alpaca"),
    ({"prompt": "p", "response": "r"}, "prompt_response"),
    ({"prompt": "p", "completion": "c"}, "prompt_completion"),
    ({"messages": [{"role": "user", "content": "u"}]}, "chat"),
])
def test_format_is_detected_from_the_keys(fields: dict, fmt: str) -> None:
    assert D.detect_format([rec(**fields)]) == fmt


def test_unknown_record_shape_is_an_error() -> None:
    with pytest.raises(AlignError, match=r"test.jsonl:1: cannot tell the record format.*\['question'\]"):
        D.detect_format([rec(question="q")])


# ----------------------------------------------------------------------------------------------
# Reading files and reporting bad lines


def test_malformed_lines_are_reported_together_with_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    lines = [b'{"prompt": "a", "response": "b"}', b'{"prompt": "a", "response": ', b'{"prompt": "c", "response": "d"}',
             b'[1, 2]', b'', b'{"prompt": "\xff\xfe", "response": "x"}', b'{"prompt": "e", "response": "f"}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as e:
        D.read_records(str(path))
    message = str(e.value)
    assert len(e.value.problems) == 3 and "\n" not in message
    assert f"{path}:2: invalid JSON" in message
    assert f"{path}:4: expected a JSON object, got list" in message
    assert f"{path}:6: not valid UTF-8" in message


def test_missing_and_empty_fields_are_reported_together(tmp_path: Path) -> None:
    path = tmp_path / "fields.jsonl"
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "a"}, {"prompt": "a", "response": "  "},
            {"prompt": 3, "response": "x"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    records = D.read_records(str(path))
    with pytest.raises(DataError) as e:
        D.validate_records(records, D.detect_format(records))
    assert e.value.problems == [f"{path}:2: missing field 'response'", f"{path}:3: field 'response' is empty",
                                f"{path}:4: field 'prompt' must be a string, got int"]


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(AlignError, match="no records"):
        D.read_records(str(empty))
    with pytest.raises(AlignError, match="does not exist"):
        D.read_records(str(tmp_path / "missing.jsonl"))


def test_json_array_file_and_max_samples(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"prompt": str(i), "response": "r"} for i in range(5)]), encoding="utf-8")
    records = D.read_records(str(path), max_samples=3)
    assert [r.fields["prompt"] for r in records] == ["0", "1", "2"]
    assert records[1].where == f"{path}[2]"


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_csv_and_parquet_load_through_datasets(tmp_path: Path, tokenizer: Any, kind: str) -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"prompt": ["1+1=", "1加1等于几?", "2+2="], "response": ["2", "1加1等于2。", "4"]})
    path = tmp_path / f"data.{kind}"
    frame.to_csv(path, index=False) if kind == "csv" else frame.to_parquet(path, index=False)
    records = D.read_records(str(path))
    assert [r.fields for r in records] == frame.to_dict("records")
    assert D.detect_format(records) == "prompt_response"
    examples, _ = D.tokenize_sft(records, "prompt_response", "{prompt}", tokenizer, 64, "error")
    trained = [t for t, m in zip(examples[1].input_ids, examples[1].loss_mask) if m]
    assert tokenizer.decode(trained) == "1加1等于2。" + tokenizer.eos_token
    assert records[2].where == (f"{path}:4" if kind == "csv" else f"{path}:row 3")


def test_csv_missing_cell_is_reported_by_line(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("prompt,response\n1+1=,2\n2+2=,\n", encoding="utf-8")
    records = D.read_records(str(path))
    with pytest.raises(DataError, match=rf"{path}:3: missing field 'response'"):
        D.validate_records(records, "prompt_response")


# ----------------------------------------------------------------------------------------------
# Truncation and the validation split


def length_records() -> list[D.Record]:
    # prompt "p" is one token; each response character is one token; + EOS
    return [D.Record(f"f.jsonl:{i + 1}", {"prompt": "p", "response": "x" * n}) for i, n in enumerate([3, 20, 5, 30])]


def test_truncation_drop_counts_and_keeps_the_short(tokenizer: Any) -> None:
    examples, report = D.tokenize_sft(length_records(), "prompt_response", "{prompt}", tokenizer, 10, "drop")
    assert (report.kept, report.dropped, report.truncated) == (2, 2, 0)
    assert [len(e.input_ids) for e in examples] == [5, 7]
    assert "2 dropped" in str(report)


def test_truncation_truncate_cuts_the_response_and_counts(tokenizer: Any) -> None:
    examples, report = D.tokenize_sft(length_records(), "prompt_response", "{prompt}", tokenizer, 10, "truncate")
    assert (report.kept, report.dropped, report.truncated) == (4, 0, 2)
    cut = examples[1]
    assert len(cut.input_ids) == 10 and cut.loss_mask == [0] + [1] * 9
    assert tokenizer.decode(cut.input_ids) == "p" + "x" * 9  # the cut response has no EOS
    assert tokenizer.eos_token_id not in cut.input_ids
    assert "2 truncated" in str(report)


def test_truncate_drops_an_example_whose_prompt_fills_the_window(tokenizer: Any) -> None:
    records = [D.Record("f:1", {"prompt": "p" * 12, "response": "x"}), D.Record("f:2", {"prompt": "p", "response": "x"})]
    _, report = D.tokenize_sft(records, "prompt_response", "{prompt}", tokenizer, 10, "truncate")
    assert (report.kept, report.dropped, report.truncated) == (1, 1, 0)


def test_truncation_error_names_the_line(tokenizer: Any) -> None:
    with pytest.raises(AlignError, match=r"f.jsonl:2: example is 22 tokens, longer than data.max_length \(10\)"):
        D.tokenize_sft(length_records(), "prompt_response", "{prompt}", tokenizer, 10, "error")


def test_all_examples_too_long_is_an_error(tokenizer: Any) -> None:
    with pytest.raises(AlignError, match="none left"):
        D.tokenize_sft(length_records(), "prompt_response", "{prompt}", tokenizer, 4, "drop")


def test_split_validation_by_fraction() -> None:
    items = list(range(40))
    train, val = D.split_validation(items, 0.25, seed=1)
    assert len(val) == 10 and len(train) == 30
    assert sorted(train + val) == items
    assert D.split_validation(items, 0.25, seed=1) == (train, val)  # seeded
    assert D.split_validation(items, 0.25, seed=2)[1] != val
    assert D.split_validation(items, 0.0, seed=1) == (items, [])
    assert len(D.split_validation(items, 0.001, seed=1)[1]) == 1  # at least one when fraction > 0


def test_sft_examples_hold_out_val_fraction(make_sft_config: Any, tokenizer: Any, tmp_path: Path) -> None:
    from align.sft import load_sft_examples

    cfg = make_sft_config(tmp_path / "run", {"data.validation": None, "data.val_fraction": 0.25})
    train, val, report = load_sft_examples(cfg, tokenizer)
    assert (len(train), len(val)) == (180, 60)
    assert "validation: 60 examples" in report


def test_global_batches_cover_each_epoch_once_and_drop_the_partial_batch() -> None:
    batches = D.global_batches(10, 4, seed=3)
    first = [next(batches) for _ in range(2)]
    assert [(e, i) for e, i, _ in first] == [(0, 0), (0, 1)]
    seen = first[0][2] + first[1][2]
    assert len(set(seen)) == 8 and seen == D.epoch_order(10, 3, 0)[:8]
    assert next(batches)[:2] == (1, 0)  # the two left over are dropped, not carried over
    assert D.shard([0, 1, 2, 3, 4, 5, 6, 7], rank=1, world=2) == [4, 5, 6, 7]


def test_context_length_is_the_smallest_stated_context() -> None:
    from types import SimpleNamespace

    from align.modeling import context_length

    llama, gpt2, unknown = (SimpleNamespace(max_position_embeddings=256), SimpleNamespace(n_positions=64),
                            SimpleNamespace(hidden_size=8))
    assert context_length(llama) == 256
    assert context_length(llama, gpt2, unknown) == 64
    assert context_length(unknown) is None and context_length() is None


def test_a_kept_example_past_the_context_is_an_error_but_a_dropped_one_is_not() -> None:
    from align.data import Example, TokenizeReport, fit_length

    ex = Example(list(range(10)), [0] * 4 + [1] * 6)
    report = TokenizeReport()
    assert fit_length(ex, 8, "drop", "f:1", report, context=8) is None  # dropped by max_length first
    assert fit_length(ex, 12, "drop", "f:2", report, context=12) is ex
    with pytest.raises(DataError, match=r"f:3: example is 8 tokens, longer than the model's context \(6 positions\)"):
        fit_length(ex, 8, "truncate", "f:3", report, context=6)
    assert (report.kept, report.dropped, report.truncated) == (1, 1, 1)
