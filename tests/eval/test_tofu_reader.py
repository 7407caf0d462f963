"""The TOFU-format reader: JSON lines and arrays, split names, errors naming file and record."""

from __future__ import annotations

import json

import pytest
from tofu_fixture import write_tofu

from unlearn_kernels.eval import QAItem, read_tofu


def test_json_lines_and_arrays_read_the_same(tmp_path):
    lines = read_tofu(write_tofu(tmp_path / "lines", jsonl=True))
    array = read_tofu(write_tofu(tmp_path / "array", jsonl=False))
    assert lines == array
    assert len(lines.forget) == len(lines.retain) == len(lines.holdout) == 6
    item = lines.forget[0]
    record = json.loads(
        (tmp_path / "lines" / "forget10_perturbed.json").read_text().splitlines()[0]
    )
    assert item == QAItem(
        record["question"],
        record["answer"],
        record["paraphrased_answer"],
        tuple(record["perturbed_answer"]),
    )
    assert lines.world_facts[0].paraphrased_answer is None
    assert len(lines.world_facts[0].perturbed_answers) == 2
    assert lines.real_authors is not None and lines.forget_split == "forget10"


def test_split_names_and_optional_real_authors(tmp_path):
    data = read_tofu(write_tofu(tmp_path, forget_split="forget05", real_authors=False), "forget05")
    assert data.real_authors is None and data.forget_split == "forget05"
    for bad in ("forget5", "retain90", "forget00", 10):
        with pytest.raises(ValueError, match="forget_split"):
            read_tofu(tmp_path, bad)
    with pytest.raises(ValueError, match=r"forget10_perturbed\.json is missing"):
        read_tofu(tmp_path, "forget10")
    with pytest.raises(ValueError, match="data_dir"):
        read_tofu(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"retain_perturbed.json:2: not valid JSON"),
        ('["a list"]', r"retain_perturbed.json:2: expected a JSON object"),
        ('{"question": "q", "answer": 3}', r"retain_perturbed.json:2: 'answer' must be a string"),
        (
            '{"question": "q", "answer": "a", "perturbed_answer": ["x"]}',
            r"retain_perturbed.json:2: 'paraphrased_answer' must be a string",
        ),
        (
            '{"question": "q", "answer": "a", "paraphrased_answer": "p", "perturbed_answer": "x"}',
            r"retain_perturbed.json:2: 'perturbed_answer' must be a non-empty list",
        ),
        (
            '{"question": "q", "answer": "a", "paraphrased_answer": "p", "perturbed_answer": []}',
            r"retain_perturbed.json:2: 'perturbed_answer' must be a non-empty list",
        ),
    ],
)
def test_malformed_record_names_file_and_line(tmp_path, line, message):
    write_tofu(tmp_path)
    path = tmp_path / "retain_perturbed.json"
    lines = path.read_text().splitlines()
    lines[1] = line
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        read_tofu(tmp_path)


def test_malformed_array_names_the_record_and_overlap_is_refused(tmp_path):
    write_tofu(tmp_path, jsonl=False)
    path = tmp_path / "world_facts_perturbed.json"
    records = json.loads(path.read_text())
    del records[3]["question"]
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"world_facts_perturbed.json\[3\]: 'question'"):
        read_tofu(tmp_path)
    path.write_text("[{]")
    with pytest.raises(ValueError, match=r"world_facts_perturbed\.json: not a valid JSON array"):
        read_tofu(tmp_path)
    path.write_text("")
    with pytest.raises(ValueError, match=r"world_facts_perturbed\.json holds no record"):
        read_tofu(tmp_path)

    write_tofu(tmp_path / "overlap", jsonl=False)
    forget = json.loads((tmp_path / "overlap" / "forget10_perturbed.json").read_text())
    retain_path = tmp_path / "overlap" / "retain_perturbed.json"
    retain = json.loads(retain_path.read_text())
    retain[0]["question"] = forget[2]["question"]
    retain_path.write_text(json.dumps(retain))
    with pytest.raises(ValueError, match="disjoint"):
        read_tofu(tmp_path / "overlap")
