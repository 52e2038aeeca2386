"""The decomposition cache: persists across processes, counts hits, survives two concurrent writers."""
import multiprocessing as mp
import pickle
import sqlite3
import time

import pytest

from reward_service.cache import CacheCorruptError, DecompositionCache
from reward_service.schema import DecomposerVersion, Question, QuestionSet, prompt_key

V1 = DecomposerVersion(name="test", template_version="t1")
V2 = DecomposerVersion(name="test", template_version="t2")


def make(i: int, version: DecomposerVersion = V1, *, tag: str = "") -> QuestionSet:
    prompt = f"prompt number {i}"
    return QuestionSet(prompt=prompt, prompt_hash=prompt_key(prompt), version=version, notes=(tag,) if tag else (),
                       questions=(Question(id="e", text=f"is there thing {i}?", kind="semantic", category="existence"),
                                  Question(id="c", text=f"are there {i} things?", kind="semantic", category="count",
                                           parents=("e",)),
                                  Question(id="q", text="is it sharp?", kind="quality", category="geometry")))


def _writer(path: str, ids: list[int], tag: str, batch: int, barrier=None, times=None) -> None:
    """Runs in a separate (spawned) process: store `ids`, mixing batches and single puts.

    With a barrier, both writers open the (new) file and start writing at the same moment."""
    if barrier is not None:
        barrier.wait(60)
    start = time.monotonic()
    cache = DecompositionCache(path)
    for start in range(0, len(ids), batch):
        chunk = [make(i, tag=tag) for i in ids[start:start + batch]]
        if start % (2 * batch) == 0:
            cache.put_many(chunk)
        else:
            for qs in chunk:
                cache.put(qs)
    cache.close()
    if times is not None:
        times.put((tag, start, time.monotonic()))


def _reader(path: str, ids: list[int], out) -> None:
    cache = DecompositionCache(path)
    found = cache.get_many((make(i).prompt_hash, V1) for i in ids)
    out.put((len(found), cache.stats().hits, cache.stats().misses))


def test_put_get_and_hit_rate(tmp_path):
    cache = DecompositionCache(tmp_path / "sub" / "cache.sqlite")
    assert cache.hit_rate == 0.0 and len(cache) == 0
    assert cache.get(make(1).prompt_hash, V1) is None
    assert cache.put(make(1)) and not cache.put(make(1, tag="second"))      # first write wins
    got = cache.get(make(1).prompt_hash, V1)
    assert got == make(1) and got.notes == ()
    assert cache.get(make(1).prompt_hash, V2) is None                         # the version is part of the key
    assert cache.put_many([make(1, V2), make(2), make(3)]) == 3 and len(cache) == 4
    found = cache.get_many([(make(i).prompt_hash, V1) for i in (1, 2, 3, 4, 2)])
    assert set(found) == {(make(i).prompt_hash, str(V1)) for i in (1, 2, 3)}
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.rows) == (4, 3, 4) and stats.hit_rate == pytest.approx(4 / 7)
    assert (make(2).prompt_hash, V1) in cache and (make(9).prompt_hash, V1) not in cache
    assert cache.stats().hits == 4                                           # `in` is not a lookup


def test_get_or_put_decomposes_only_on_a_miss(tmp_path):
    cache = DecompositionCache(tmp_path / "c.sqlite")
    calls = []

    def decompose():
        calls.append(1)
        return make(5)

    key = (make(5).prompt_hash, V1)
    assert cache.get_or_put(*key, decompose) == make(5)
    assert cache.get_or_put(*key, decompose) == make(5)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="not of"):
        cache.get_or_put(make(6).prompt_hash, V1, decompose)


def test_persists_across_processes(tmp_path):
    path = str(tmp_path / "c.sqlite")
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_writer, args=(path, list(range(20)), "child", 7))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    cache = DecompositionCache(path)                      # a fresh handle in this process
    assert len(cache) == 20 and cache.get(make(7).prompt_hash, V1).notes == ("child",)
    cache.put(make(100))
    cache.close()
    out = ctx.Queue()
    p = ctx.Process(target=_reader, args=(path, [7, 100, 200], out))
    p.start()
    assert out.get(timeout=60) == (2, 2, 1)
    p.join(60)


def test_two_concurrent_writers_with_overlapping_keys(tmp_path):
    path = str(tmp_path / "fresh.sqlite")            # both processes also race to create the file
    ctx = mp.get_context("spawn")
    barrier, times = ctx.Barrier(2), ctx.Queue()
    a = ctx.Process(target=_writer, args=(path, list(range(0, 300)), "a", 5, barrier, times))
    b = ctx.Process(target=_writer, args=(path, list(range(299, -1, -1)) + list(range(300, 400)), "b", 3, barrier,
                                          times))
    a.start()
    b.start()
    spans = dict((tag, (t0, t1)) for tag, t0, t1 in (times.get(timeout=120), times.get(timeout=120)))
    a.join(60)
    b.join(60)
    assert (a.exitcode, b.exitcode) == (0, 0)
    assert spans["a"][0] < spans["b"][1] and spans["b"][0] < spans["a"][1]      # they did write at the same time
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cache = DecompositionCache(path)
    assert len(cache) == 400
    found = cache.get_many((make(i).prompt_hash, V1) for i in range(400))   # every row parses and matches its key
    assert len(found) == 400
    for i in range(400):
        qs = found[(make(i).prompt_hash, str(V1))]
        assert qs.questions == make(i).questions and qs.notes in (("a",), ("b",))
    assert all(found[(make(i).prompt_hash, str(V1))].notes == ("b",) for i in range(300, 400))


def test_a_corrupt_row_is_reported_not_returned(tmp_path):
    path = tmp_path / "c.sqlite"
    cache = DecompositionCache(path)
    cache.put(make(1))
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO question_sets VALUES (?, ?, ?, ?, ?)", ("h", str(V1), "p", "{not json", 0.0))
        db.execute("UPDATE question_sets SET prompt_hash = 'moved' WHERE prompt_hash = ?", (make(1).prompt_hash,))
    with pytest.raises(CacheCorruptError, match="row \\('h'"):
        cache.get("h", V1)
    with pytest.raises(CacheCorruptError, match="holds the set of"):
        cache.get("moved", V1)


def test_pickles_without_its_connection(tmp_path):
    cache = DecompositionCache(tmp_path / "c.sqlite")
    cache.put(make(1))
    clone = pickle.loads(pickle.dumps(cache))
    assert clone.get(make(1).prompt_hash, V1) == make(1)
