"""Prompt files: every format, every kind of bad row (error naming file and line, or skipped and
counted), GenEval / Flow-GRPO metadata lines as they are, and the seeded stream's state."""
import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from worlds.files import PromptFileError, ShuffledStream, check_disjoint, read_prompt_file

# verbatim in form: GenEval's evaluation_metadata.jsonl and Flow-GRPO's geneval train_metadata.jsonl lines
GENEVAL = {"tag": "counting", "include": [{"class": "bench", "count": 2}], "exclude": [{"class": "bench", "count": 3}],
           "prompt": "a photo of two benches"}
FLOW_GRPO = {"tag": "color_attr", "include": [{"class": "dog", "count": 1, "color": "red"},
                                              {"class": "cat", "count": 1, "color": "blue"}],
             "prompt": "a photo of a red dog and a blue cat"}


def _write(path, rows):
    suffix = path.suffix
    if suffix == ".txt":
        path.write_text("".join(f"{r}\n" for r in rows))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv", ".parquet"])
def test_each_format_loads_with_its_metadata(tmp_path, suffix):
    rows = (["a red apple", "two dogs"] if suffix == ".txt" else
            [{"prompt": "a red apple", "tag": "colors", "seed": 1}, {"prompt": "two dogs", "tag": "counting", "seed": 2}])
    f = read_prompt_file(_write(tmp_path / f"p{suffix}", rows))
    assert [r.text for r in f.records] == ["a red apple", "two dogs"] and not f.skipped
    assert [r.id for r in f.records] == [f"p{suffix}:{n}" for n in ((1, 2) if suffix in (".txt", ".jsonl") else
                                                                     (2, 3) if suffix == ".csv" else (1, 2))]
    if suffix != ".txt":
        assert [r.category for r in f.records] == ["colors", "counting"]
        assert f.records[0].metadata["seed"] in (1, "1")               # csv values are text
    assert all(r.world == "" and r.meaning is None for r in f.records)


def test_geneval_and_flow_grpo_metadata_lines_are_read_as_they_are(tmp_path):
    f = read_prompt_file(_write(tmp_path / "evaluation_metadata.jsonl", [GENEVAL, FLOW_GRPO]))
    assert [r.text for r in f.records] == [GENEVAL["prompt"], FLOW_GRPO["prompt"]]
    assert [r.category for r in f.records] == ["counting", "color_attr"]
    assert f.records[0].metadata == {k: v for k, v in GENEVAL.items() if k != "prompt"}
    assert f.records[1].metadata["include"][1] == {"class": "cat", "count": 1, "color": "blue"}


BAD = [  # (file name, raw bytes, the error's words)
    ("a.txt", b"fine\n\nalso fine\n", "a.txt:2: empty prompt"),
    ("a.txt", b"fine\nbad \xff byte\n", "a.txt:2: not UTF-8"),
    ("a.jsonl", b'{"prompt": "ok"}\n{"prompt": "x"\n', "a.jsonl:2: not JSON"),
    ("a.jsonl", b'{"prompt": "ok"}\n["a list"]\n', "a.jsonl:2: a JSON list, not an object"),
    ("a.jsonl", b'{"prompt": "ok"}\n{"caption": "no prompt"}\n', "a.jsonl:2: no 'prompt' field"),
    ("a.jsonl", b'{"prompt": "ok"}\n{"prompt": 7}\n', "a.jsonl:2: 'prompt' is a int, not text"),
    ("a.jsonl", b'{"prompt": "ok"}\n\n', "a.jsonl:2: empty line"),
    ("a.jsonl", b'{"prompt": "ok"}\n{"prompt": "\\u00e9t\xe9"}\n', "a.jsonl:2: not UTF-8"),
    ("a.csv", b'prompt,tag\nok,t\n"",t\n', "a.csv:3: empty prompt"),
    ("a.csv", b'prompt,tag\nok,t\nbad \xff,t\n', "a.csv:3: not UTF-8"),
]


@pytest.mark.parametrize("name,raw,words", BAD)
def test_bad_rows_name_file_and_line_or_are_skipped_and_counted(tmp_path, name, raw, words):
    path = tmp_path / name
    path.write_bytes(raw)
    with pytest.raises(PromptFileError, match=words.replace("(", r"\(")):
        read_prompt_file(path)
    f = read_prompt_file(path, on_bad_row="skip")
    assert sum(f.skipped.values()) == 1 and len(f.records) == (2 if name == "a.txt" and b"also" in raw else 1)
    assert list(f.skipped) == [words.split(": ", 1)[1].split(" (")[0]]


def test_parquet_bad_rows_and_missing_column(tmp_path):
    path = _write(tmp_path / "p.parquet", [{"prompt": "ok"}, {"prompt": ""}, {"prompt": None}])
    with pytest.raises(PromptFileError, match=r"p.parquet: row 2: empty prompt"):
        read_prompt_file(path)
    assert dict(read_prompt_file(path, on_bad_row="skip").skipped) == {"empty prompt": 1, "no 'prompt' field": 1}
    with pytest.raises(PromptFileError, match=r"p.parquet: no 'caption' column"):
        read_prompt_file(path, column="caption")
    pq.write_table(pa.table({"prompt": pa.array([b"ok", b"\xff"], type=pa.binary())}), tmp_path / "b.parquet")
    with pytest.raises(PromptFileError, match=r"b.parquet: row 2: not UTF-8"):
        read_prompt_file(tmp_path / "b.parquet")


def test_too_long_prompts_and_file_level_errors(tmp_path):
    path = _write(tmp_path / "p.txt", ["short one", "a much longer prompt than the limit allows"])
    with pytest.raises(PromptFileError, match=r"p.txt:2: prompt of 8 tokens is longer than the 5"):
        read_prompt_file(path, max_tokens=5, count_tokens=lambda t: len(t.split()))
    assert dict(read_prompt_file(path, max_tokens=5, count_tokens=lambda t: len(t.split()),
                                 on_bad_row="skip").skipped) == {"prompt of 8 tokens is longer than the 5 the model's context allows": 1}
    with pytest.raises(PromptFileError, match="no such prompt file"):
        read_prompt_file(tmp_path / "missing.txt")
    with pytest.raises(PromptFileError, match=r"unknown prompt file format '.tsv'"):
        (tmp_path / "p.tsv").write_text("x\n")
        read_prompt_file(tmp_path / "p.tsv")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(PromptFileError, match=r"empty.txt: no usable prompt \(skipped: \{'empty prompt': 2\}\)"):
        read_prompt_file(tmp_path / "empty.txt", on_bad_row="skip")


def test_heldout_overlap_is_refused_naming_both_places(tmp_path):
    train = read_prompt_file(_write(tmp_path / "train.txt", ["a red apple", "Two   Dogs"])).records
    held = read_prompt_file(_write(tmp_path / "held.txt", ["a blue bench", "two dogs"])).records
    with pytest.raises(PromptFileError, match=r"train.txt:2: 'Two   Dogs' is a held-out prompt \(.*held.txt:2\)"):
        check_disjoint(train, held)
    check_disjoint(train[:1], held)


def test_stream_is_seeded_covers_each_epoch_and_resumes_exactly(tmp_path):
    records = read_prompt_file(_write(tmp_path / "p.txt", [f"prompt {i}" for i in range(7)])).records
    a, b = ShuffledStream(records, seed=5), ShuffledStream(records, seed=5)
    first = [a.next().id for _ in range(21)]
    assert first == [b.next().id for _ in range(21)]
    for e in range(3):                                                 # every epoch is a permutation
        assert sorted(first[7 * e:7 * e + 7]) == sorted(r.id for r in records)
    assert first[:7] != first[7:14]                                    # a new order each epoch
    assert first[:7] != [r.id for r in records]                        # shuffled
    assert [s.next().id for s in [ShuffledStream(records, seed=5, shuffle=False)] for _ in range(7)] == \
        [r.id for r in records]
    c = ShuffledStream(records, seed=5)
    for _ in range(10):
        c.next()
    state = json.loads(json.dumps(c.state()))                          # survives a JSON round trip
    d = ShuffledStream(records, seed=5)
    d.restore(state)
    assert [d.next().id for _ in range(11)] == first[10:21]
    with pytest.raises(ValueError, match="cannot restore"):
        d.restore({"epoch": 0, "position": 99})
