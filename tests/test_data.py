"""The data pipeline: readers, formats, validation errors (with line numbers), split, overlong policy."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cura.data import DataConfig, detect_format, normalize, read_rows, split_prompt_reference, split_rows
from cura.data.formats import RowError
from cura.errors import CuraError

ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
CHAT = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---- formats -------------------------------------------------------------------------------------------


def test_alpaca_with_and_without_input_and_system():
    _, msgs = normalize(ALPACA, "auto", {})
    assert msgs == [
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    kind, msgs = normalize(
        {"instruction": "Say hi.", "input": "", "output": "hi", "system": "Be brief."}, "auto", {}
    )
    assert kind == "alpaca"
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    assert msgs[1] == {"role": "user", "content": "Say hi."}


def test_messages_sharegpt_and_prompt_completion_normalize_to_the_same_chat():
    sharegpt = {
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "2+2?"},
            {"from": "gpt", "value": "4"},
        ]
    }
    assert normalize({"messages": CHAT}, "auto", {}) == ("messages", CHAT)
    assert normalize(sharegpt, "auto", {}) == ("sharegpt", CHAT)
    pair = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert normalize({"prompt": "Q", "completion": "A"}, "auto", {}) == ("prompt_completion", pair)
    assert normalize({"input": "Q", "output": "A"}, "auto", {}) == ("prompt_completion", pair)
    assert normalize({"question": "Q", "answer": "A"}, "auto", {}) == ("prompt_completion", pair)


def test_guanaco_turns_are_split():
    record = {
        "input": "### Human: Hi there ### Assistant: Hello! ### Human: What is 2+2? ### Assistant:",
        "output": "4",
    }
    kind, msgs = normalize(record, "auto", {})
    assert kind == "guanaco"
    assert msgs == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]


def test_text_format_and_field_mapping_and_system_prompt():
    assert normalize({"text": "Once upon a time."}, "auto", {}) == ("text", "Once upon a time.")
    kind, msgs = normalize(
        {"dialogue": "A: hi", "summary": "A greets."},
        "prompt_completion",
        {"prompt": "dialogue", "completion": "summary"},
        system_prompt="Summarize.",
    )
    assert msgs == [
        {"role": "system", "content": "Summarize."},
        {"role": "user", "content": "A: hi"},
        {"role": "assistant", "content": "A greets."},
    ]


def test_detect_format_unknown():
    assert detect_format({"query": "q", "reply": "a"}) is None
    with pytest.raises(RowError, match="unknown format"):
        normalize({"query": "q", "reply": "a"}, "auto", {})


def test_split_prompt_reference():
    prompt, reference = split_prompt_reference(CHAT)
    assert prompt == CHAT[:3] and reference == "4"


# ---- readers -------------------------------------------------------------------------------------------


def expected_rows(n):
    return [{"instruction": f"Task {i}", "input": "", "output": f"Answer {i}"} for i in range(n)]


def test_jsonl_json_csv_parquet_and_folder_read_alike(tmp_path):
    records = expected_rows(7)
    write_jsonl(tmp_path / "a.jsonl", records)
    (tmp_path / "b.json").write_text(json.dumps(records, indent=2))
    (tmp_path / "c.json").write_text(json.dumps({"meta": "x", "data": records}))
    with open(tmp_path / "d.csv", "w", newline="") as handle:
        import csv

        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "e.parquet", row_group_size=3)
    write_jsonl(tmp_path / "f.json", records)  # JSON Lines under a .json name, as datasets.to_json writes
    want = [r["messages"] for r in read_rows(tmp_path / "a.jsonl")]
    assert want[3] == [{"role": "user", "content": "Task 3"}, {"role": "assistant", "content": "Answer 3"}]
    for name in ("b.json", "c.json", "d.csv", "e.parquet", "f.json"):
        assert [r["messages"] for r in read_rows(tmp_path / name)] == want, name
    folder_rows = list(read_rows(tmp_path))
    assert len(folder_rows) == 6 * 7
    assert {r["format"] for r in folder_rows} == {"alpaca"}


def test_locations_are_file_and_line(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps(expected_rows(3), indent=2))
    sources = [r["source"] for r in read_rows(tmp_path / "b.json")]
    lines = (tmp_path / "b.json").read_text().splitlines()
    for source in sources:
        line = int(source.rsplit(":", 1)[1])
        assert lines[line - 1].strip() == "{"
    with open(tmp_path / "d.csv", "w") as handle:
        handle.write('instruction,output\n"multi\nline",a\nsecond,b\n')
    assert [r["source"].rsplit(":", 1)[1] for r in read_rows(tmp_path / "d.csv")] == ["2", "4"]


def test_datasets_save_to_disk_folder(tmp_path):
    import datasets

    records = [{"messages": CHAT, "id": i} for i in range(5)]
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    rows = list(read_rows(tmp_path / "saved"))
    assert len(rows) == 5 and all(r["messages"] == CHAT for r in rows)


# ---- validation errors ---------------------------------------------------------------------------------


def test_every_bad_row_reported_at_once_with_its_line(tmp_path):
    good = {"messages": CHAT}
    lines = [
        json.dumps(good),  # 1
        "{not json",  # 2
        json.dumps({"messages": [{"role": "user", "content": "x"}]}),  # 3: no assistant turn
        json.dumps({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}),
        json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}),
        "",  # 6: blank lines are skipped
        json.dumps({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"prompt": "x"}),  # 8: other format in the file
        json.dumps(good),  # 9
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CuraError) as info:
        list(read_rows(path))
    message = str(info.value).splitlines()
    assert message[0].startswith("6 bad rows in ")
    assert [m.split(": ", 1)[0] for m in message[1:]] == [f"{path}:{n}" for n in (2, 3, 4, 5, 7, 8)]
    assert "invalid JSON" in message[1]
    assert "does not end with an assistant turn" in message[2]
    assert "'assistant' where 'user' was expected" in message[3]
    assert "not text" in message[4]
    assert "empty" in message[5]
    assert "'messages'" in message[6] or "missing" in message[6]


def test_max_errors_limits_the_list(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": "x", "output": ""}) for _ in range(10)) + "\n")
    with pytest.raises(CuraError) as info:
        list(read_rows(path, max_errors=3))
    lines = str(info.value).splitlines()
    assert lines[0].startswith("10 bad rows") and "first 3 shown" in lines[0]
    assert len(lines) == 4 and lines[3].startswith(f"{path}:3: field 'output' is empty")


def test_unknown_format_and_missing_mapped_column(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"query": "q", "reply": "a"}])
    with pytest.raises(CuraError, match=r"x.jsonl:1: unknown format"):
        list(read_rows(path))
    with pytest.raises(CuraError, match=r"x.jsonl:1: no column 'dialogue'"):
        list(read_rows(path, fields={"prompt": "dialogue"}))
    rows = list(read_rows(path, fields={"prompt": "query", "completion": "reply"}))
    assert rows[0]["messages"][1] == {"role": "assistant", "content": "a"}


def test_bad_json_array_and_paths(tmp_path):
    (tmp_path / "broken.json").write_text('[\n {"text": "a"},\n {"text": \n]')
    with pytest.raises(CuraError, match=r"broken.json:4: invalid JSON"):
        list(read_rows(tmp_path / "broken.json"))
    with pytest.raises(CuraError, match="does not exist"):
        list(read_rows(tmp_path / "nope.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CuraError, match="no data files"):
        list(read_rows(tmp_path / "empty"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(CuraError, match="cannot read .txt"):
        list(read_rows(tmp_path / "x.txt"))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"format": "yaml"}, "data.format"),
        ({"overlong": "cut"}, "data.overlong"),
        ({"max_length": 1}, "data.max_length"),
        ({"eval_split": -0.5}, "data.eval_split"),
        ({"eval_split": 2.5}, "data.eval_split"),
        ({"fields": {"prompt": 3}}, "data.fields"),
        ({"max_errors": 0}, "data.max_errors"),
    ],
)
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(CuraError, match=key.replace(".", r"\.")):
        DataConfig(**kwargs)


# ---- split ---------------------------------------------------------------------------------------------


def test_split_fraction_and_count_seeded():
    rows = [{"i": i} for i in range(100)]
    train, held = split_rows(rows, 0.1, seed=0)
    assert len(held) == 10 and len(train) == 90
    assert {r["i"] for r in train} | {r["i"] for r in held} == set(range(100))
    assert split_rows(rows, 0.1, seed=0) == (train, held)
    assert split_rows(rows, 0.1, seed=1)[1] != held
    assert len(split_rows(rows, 7, seed=0)[1]) == 7
    assert split_rows(rows, 0, seed=0) == (rows, [])
    assert split_rows(rows[:9], 0.05, seed=0) == (rows[:9], [])  # too few rows to spare one
    assert len(split_rows(rows[:30], 0.05, seed=0)[1]) == 2
    with pytest.raises(CuraError, match="leaving none"):
        split_rows(rows, 100, seed=0)
