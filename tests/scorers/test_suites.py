"""Prompt suites: the built-in GenEval generator against GenEval's published counts, and the file readers."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from soarflow.scorers.suites import (
    COCO_CLASSES,
    GENEVAL_COUNTS,
    PromptRecord,
    generate_geneval,
    load_suite,
    read_geneval_metadata,
    read_prompt_file,
)


def test_geneval_generator_matches_the_published_suite():
    records = generate_geneval()
    assert len(records) == 553
    assert Counter(r.tag for r in records) == GENEVAL_COUNTS
    assert sum(GENEVAL_COUNTS.values()) == 553
    # the published evaluation_metadata.jsonl starts with these three lines
    assert records[0].metadata == {
        "tag": "single_object",
        "include": [{"class": "bench", "count": 1}],
        "prompt": "a photo of a bench",
    }
    assert [r.prompt for r in records[1:3]] == ["a photo of a cow", "a photo of a bicycle"]
    assert sorted(r.metadata["include"][0]["class"] for r in records if r.tag == "single_object") == sorted(
        COCO_CLASSES
    )
    assert len({json.dumps(r.metadata, sort_keys=True) for r in records}) == 553  # duplicates dropped


def test_geneval_lines_follow_the_format_of_each_tag():
    by_tag = {}
    for r in generate_geneval():
        by_tag.setdefault(r.tag, []).append(r.metadata)
    for m in by_tag["counting"]:
        k = m["include"][0]["count"]
        assert 2 <= k <= 4 and m["exclude"] == [{"class": m["include"][0]["class"], "count": k + 1}]
        assert m["prompt"].startswith(f"a photo of {['two', 'three', 'four'][k - 2]} ")
    for m in by_tag["colors"] + by_tag["color_attr"]:
        assert all(c["class"] != "person" and "color" in c for c in m["include"])  # no coloured person
    for m in by_tag["position"]:
        (b, a) = m["include"]
        assert a["position"][1] == 0 and a["position"][0] in ("left of", "right of", "above", "below")
        assert m["prompt"].endswith(("a " if b["class"][0] not in "aeiou" else "an ") + b["class"])
    assert any(m["prompt"] == "a photo of an orange" for m in by_tag["single_object"])  # a / an
    assert any("buses" in m["prompt"] for m in by_tag["counting"])  # plural of a word ending in s
    assert len(generate_geneval(seed=1)) != 0 and generate_geneval(seed=1)[0] != generate_geneval()[0]


def test_geneval_metadata_file_is_read_as_given(tmp_path):
    lines = [
        {
            "tag": "counting",
            "include": [{"class": "clock", "count": 2}],
            "exclude": [{"class": "clock", "count": 3}],
            "prompt": "a photo of two clocks",
            "extra": [1, 2],
        },
        {
            "tag": "position",
            "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
            "prompt": "a photo of a dog right of a teddy bear",
        },
    ]
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    records = load_suite("geneval", path)
    assert [r.metadata for r in records] == lines and records[1].tag == "position"
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n[1]\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object"):
        read_geneval_metadata(tmp_path / "bad.jsonl")
    (tmp_path / "untagged.jsonl").write_text('{"prompt": "a cat"}\n')
    with pytest.raises(ValueError, match="need a 'tag'"):
        load_suite("geneval", tmp_path / "untagged.jsonl")


def test_prompt_files_txt_jsonl_csv(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_prompt_file(tmp_path / "p.txt") == [PromptRecord("a cat"), PromptRecord("a dog")]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat", "id": 3}\n')
    assert read_prompt_file(tmp_path / "p.jsonl")[0].metadata == {"prompt": "a cat", "id": 3}
    (tmp_path / "drawbench.csv").write_text('Prompts,Category\n"a red, round ball",Colors\n,Empty\n')
    assert read_prompt_file(tmp_path / "drawbench.csv") == [PromptRecord("a red, round ball", {"Category": "Colors"})]
    (tmp_path / "nocol.csv").write_text("text\nx\n")
    with pytest.raises(ValueError, match="no 'Prompts' or 'prompt' column"):
        read_prompt_file(tmp_path / "nocol.csv")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompt_file(tmp_path / "missing.txt")


def test_suites_that_are_not_shipped_need_their_file(tmp_path):
    with pytest.raises(ValueError, match="drawbench.*--prompts_file"):
        load_suite("drawbench")
    with pytest.raises(ValueError, match="unknown suite 'parti'"):
        load_suite("parti")
    (tmp_path / "ocr.txt").write_text('a sign that says "SOAR"\na plain sign\n')
    with pytest.raises(ValueError, match="'a plain sign' has none"):
        load_suite("ocr", tmp_path / "ocr.txt")
