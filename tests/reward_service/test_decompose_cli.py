"""`python -m reward_service.decompose`: fills the cache from jsonl/parquet, resumes, rejects bad rows."""
import json
import os
import re
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reward_service.backends import shapes_decomposer
from reward_service.backends.shapes_meaning_json import canonical
from reward_service.cache import DecompositionCache
from reward_service.decompose import main
from shapes.prompts import FAMILIES, generate

ROOT = Path(__file__).resolve().parents[2]


def _rows(n, seed=0):
    rng = random.Random(seed)
    prompts = [generate(FAMILIES[i % len(FAMILIES)], rng) for i in range(n)]
    return prompts, [{"prompt": p.text, "meaning": canonical(p.meaning), "id": p.id} for p in prompts]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_fills_the_cache_then_hits_it(tmp_path):
    prompts, rows = _rows(30)
    src = _write_jsonl(tmp_path / "prompts.jsonl", rows + rows[:5])          # duplicates count once
    cache_path = tmp_path / "cache.sqlite"
    cmd = [sys.executable, "-m", "reward_service.decompose", str(src), "--cache", str(cache_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    n = len({shapes_decomposer.decompose(p.text, meaning=p.meaning).prompt_hash for p in prompts})
    assert first.returncode == 0, first.stderr
    assert f"prompts={n} already_cached=0 decomposed={n} stored={n} hit_rate=0.000" in first.stdout
    assert "decompose (shapes@shapes-v2)" in first.stderr                    # the progress bar
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert f"already_cached={n} decomposed=0 stored=0 hit_rate=1.000" in second.stdout, second.stdout
    cache = DecompositionCache(cache_path)
    for p in prompts:
        want = shapes_decomposer.decompose(p.text, meaning=p.meaning)
        assert cache.get(want.prompt_hash, shapes_decomposer.VERSION) == want


def test_parquet_input_and_custom_columns(tmp_path, capsys):
    _, rows = _rows(12, seed=1)
    table = pa.table({"caption": [r["prompt"] for r in rows], "m": [r["meaning"] for r in rows]})
    pq.write_table(table, tmp_path / "p.parquet")
    code = main([str(tmp_path / "p.parquet"), "--cache", str(tmp_path / "c.sqlite"), "--column", "caption",
                 "--meaning-column", "m", "--batch-size", "5", "--no-progress"])
    n = len(DecompositionCache(tmp_path / "c.sqlite"))
    assert code == 0 and f"stored={n}" in capsys.readouterr().out and n >= 10


@pytest.mark.parametrize("bad_line, match", [
    ("{not json", r"bad.jsonl:4: not JSON"),
    ('["a list"]', r"bad.jsonl:4: expected a JSON object"),
    ('{"prompt": "", "meaning": {}}', r"row 4: column 'prompt' must be a non-empty string"),
    ('{"prompt": "a hexagon", "meaning": {"objects": [{"shape": "hexagon"}]}}',
     r"row 4 \(prompt 'a hexagon'\): bad 'meaning': meaning.objects\[0\]"),
    ('{"prompt": "a circle"}', r"row 4 \(prompt 'a circle'\): bad 'meaning'"),
])
def test_a_bad_row_is_named_and_nothing_is_written(tmp_path, capsys, bad_line, match):
    _, rows = _rows(5, seed=2)
    lines = [json.dumps(r) for r in rows[:3]] + [bad_line] + [json.dumps(r) for r in rows[3:]]
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n")
    cache_path = tmp_path / "c.sqlite"
    assert main([str(src), "--cache", str(cache_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(src) in err
    assert re.search(match, err), err
    assert not cache_path.exists()                       # validation happens before the cache is opened


@pytest.mark.parametrize("args, match", [
    (["--backend", "vllm"], "option(s) ['model'] required"),
    (["--backend", "vllm", "--option", "model=m", "--option", "modle=x"], "unknown option(s) ['modle']"),
    (["--option", "model=m"], "backend 'shapes' takes no options"),
    (["--backend", "magic"], "not one of"),
])
def test_backend_errors(tmp_path, capsys, args, match):
    src = _write_jsonl(tmp_path / "p.jsonl", _rows(2)[1])
    assert main([str(src), "--cache", str(tmp_path / "c.sqlite"), "--no-progress", *args]) == 2
    assert match in capsys.readouterr().err


def test_file_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing.jsonl"), "--cache", str(tmp_path / "c.sqlite")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "x.csv").write_text("prompt\n")
    assert main([str(tmp_path / "x.csv"), "--cache", str(tmp_path / "c.sqlite")]) == 2
    assert "expected a .jsonl or .parquet file" in capsys.readouterr().err
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "p.parquet")
    assert main([str(tmp_path / "p.parquet"), "--cache", str(tmp_path / "c.sqlite")]) == 2
    assert "no column(s) ['prompt', 'meaning']" in capsys.readouterr().err
