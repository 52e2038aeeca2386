"""Persistent decomposition cache keyed by (prompt hash, decomposer version).

Why SQLite (stdlib) in WAL mode rather than one file per key:
  - a write is one transaction: a row is either fully there or absent, whatever crashes when;
  - concurrent writers (the offline `decompose` command and a training run, or two decompose jobs)
    are serialised by SQLite's file lock; `busy_timeout` makes the loser wait instead of failing;
    WAL lets readers proceed while one process writes;
  - `get_many` is one indexed query for a whole batch; 20K prompts are one file, not 20K inodes.
Limit: SQLite's locking needs a local (or otherwise POSIX-lock-correct) filesystem — not NFS.
On a cluster, keep the file on the node that runs the driver (or copy it read-only to each node).

Inserts never overwrite (`INSERT OR IGNORE`): the first stored decomposition of a key wins, so a
cached prompt is never re-decomposed or silently changed; a new template is a new version, a new key.
Rows are stored as `QuestionSet.to_json()` and validated again when read.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from reward_service.schema import DecomposerVersion, QuestionSet, QuestionSetError

_SCHEMA = """CREATE TABLE IF NOT EXISTS question_sets (
    prompt_hash TEXT NOT NULL,
    version     TEXT NOT NULL,
    prompt      TEXT NOT NULL,
    payload     TEXT NOT NULL,
    created     REAL NOT NULL,
    PRIMARY KEY (prompt_hash, version)) WITHOUT ROWID"""
_CHUNK = 500                      # keys per SELECT (SQLite's default limit is 32766 host parameters)


class CacheCorruptError(RuntimeError):
    """A stored row that does not parse as the question set of its key."""


@dataclass(frozen=True, kw_only=True)
class CacheStats:
    hits: int
    misses: int
    hit_rate: float               # hits / lookups; 0.0 before any lookup
    rows: int


class DecompositionCache:
    """Question sets on disk; one instance per process (it reconnects after a fork)."""

    def __init__(self, path: str | os.PathLike, *, timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid: int | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db()

    # ---- connection -----------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None, check_same_thread=False)
        deadline = time.monotonic() + self.timeout_s
        while True:     # switching to WAL takes an exclusive lock and may report busy without waiting
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute(_SCHEMA)
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._conn, self._pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    def __enter__(self) -> "DecompositionCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:          # picklable (Ray, multiprocessing): reconnect on arrival
        state = dict(self.__dict__)
        state.update(_conn=None, _pid=None, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ---- reads ----------------------------------------------------------------------------------
    def _decode(self, key: tuple[str, str], payload: str) -> QuestionSet:
        try:
            qs = QuestionSet.from_json(payload)
        except QuestionSetError as e:
            raise CacheCorruptError(f"{self.path}: row {key} does not parse: {e}") from None
        if (qs.prompt_hash, str(qs.version)) != key:
            raise CacheCorruptError(f"{self.path}: row {key} holds the set of {(qs.prompt_hash, str(qs.version))}")
        return qs

    def get(self, prompt_hash: str, version: DecomposerVersion | str) -> QuestionSet | None:
        """The stored set, or None (counted as a hit or a miss)."""
        return self.get_many([(prompt_hash, version)]).get((prompt_hash, str(version)))

    def get_many(self, keys: Iterable[tuple[str, DecomposerVersion | str]]) -> dict[tuple[str, str], QuestionSet]:
        """{(prompt_hash, str(version)): set} for the stored keys; each distinct key counts once."""
        wanted = list(dict.fromkeys((h, str(v)) for h, v in keys))
        found: dict[tuple[str, str], QuestionSet] = {}
        with self._lock:
            db = self._db()
            for i in range(0, len(wanted), _CHUNK):
                chunk = wanted[i:i + _CHUNK]
                where = " OR ".join(["(prompt_hash = ? AND version = ?)"] * len(chunk))
                rows = db.execute(f"SELECT prompt_hash, version, payload FROM question_sets WHERE {where}",
                                  [x for key in chunk for x in key]).fetchall()
                for h, v, payload in rows:
                    found[(h, v)] = self._decode((h, v), payload)
            self.hits += len(found)
            self.misses += len(wanted) - len(found)
        return found

    def __contains__(self, key: tuple[str, DecomposerVersion | str]) -> bool:
        """Is the key stored? (not counted in the hit rate)"""
        with self._lock:
            row = self._db().execute("SELECT 1 FROM question_sets WHERE prompt_hash = ? AND version = ?",
                                     (key[0], str(key[1]))).fetchone()
        return row is not None

    def __len__(self) -> int:
        with self._lock:
            return self._db().execute("SELECT COUNT(*) FROM question_sets").fetchone()[0]

    def stats(self) -> CacheStats:
        lookups = self.hits + self.misses
        return CacheStats(hits=self.hits, misses=self.misses, hit_rate=self.hits / lookups if lookups else 0.0,
                          rows=len(self))

    @property
    def hit_rate(self) -> float:
        return self.stats().hit_rate

    # ---- writes ---------------------------------------------------------------------------------
    def put_many(self, sets: Iterable[QuestionSet]) -> int:
        """Store the sets in one transaction (all or none); returns how many keys were new."""
        rows = [(qs.prompt_hash, str(qs.version), qs.prompt, qs.to_json(), time.time()) for qs in sets]
        if not rows:
            return 0
        with self._lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                before = db.total_changes
                db.executemany("INSERT OR IGNORE INTO question_sets VALUES (?, ?, ?, ?, ?)", rows)
                added = db.total_changes - before
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        return added

    def put(self, qs: QuestionSet) -> bool:
        """Store one set; False when its key was already stored (the stored one is kept)."""
        return self.put_many([qs]) == 1

    def get_or_put(self, prompt_hash: str, version: DecomposerVersion | str,
                   make: Callable[[], QuestionSet]) -> QuestionSet:
        """The stored set, or `make()` stored and returned (the stored one if another writer won)."""
        qs = self.get(prompt_hash, version)
        if qs is not None:
            return qs
        made = make()
        if (made.prompt_hash, str(made.version)) != (prompt_hash, str(version)):
            raise ValueError(f"get_or_put: make() returned the set of {(made.prompt_hash, str(made.version))}, "
                             f"not of {(prompt_hash, str(version))}")
        if self.put(made):
            return made
        with self._lock:
            payload = self._db().execute("SELECT payload FROM question_sets WHERE prompt_hash = ? AND version = ?",
                                         (prompt_hash, str(version))).fetchone()[0]
        return self._decode((prompt_hash, str(version)), payload)
