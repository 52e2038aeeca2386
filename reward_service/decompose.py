"""Offline decomposition: fill the cache for a prompt file before training.

    python -m reward_service.decompose INPUT.parquet|INPUT.jsonl --cache PATH [--backend shapes]
                                       [--column prompt] [--meaning-column meaning] [--batch-size 256]

Rows name the prompt text in `--column`. The shapes backend also needs the prompt's meaning in
`--meaning-column`: a JSON string (jsonl: also an inline object) in the format of
`reward_service.backends.shapes_meaning_json` — a string column in parquet, since a meaning's
`fact.value` is a colour name or a count and Arrow structs cannot hold both. Steps:
  1. read and validate every row (a bad row stops the run before anything is written, with an error
     naming the file and the row);
  2. look every key up in the cache (one query per 500 keys) and report the hit rate;
  3. decompose the missing prompts with a progress bar, storing each batch in one transaction, so a
     crash leaves only complete rows behind and a rerun resumes where it stopped.
LLM backends (vllm, hf, openai) plug in through `reward_service.parse.decompose_with_retries`; their
engine adapters belong to the reward actors and are not part of this module.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from reward_service.cache import DecompositionCache
from reward_service.schema import DecomposerVersion, QuestionSet

LLM_BACKENDS = ("vllm", "hf", "openai")


class InputError(ValueError):
    """A bad input file or row; the message names the file and the row."""


@dataclass(frozen=True, kw_only=True)
class Job:
    """One prompt to decompose: its key and how to make its question set."""
    row: int                                   # 1-based row (jsonl: line) number in the input
    prompt_hash: str
    make: Callable[[], QuestionSet]


def read_rows(path: Path, columns: list[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based row number, row) from a .jsonl or .parquet file."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{n}: not JSON ({e})") from None
                if not isinstance(row, dict):
                    raise InputError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
                yield n, row
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path)
        except Exception as e:            # pyarrow raises several types for unreadable files
            raise InputError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise InputError(f"{path}: no column(s) {missing} (has {table.column_names})")
        yield from enumerate(table.select(columns).to_pylist(), start=1)
    else:
        raise InputError(f"{path}: expected a .jsonl or .parquet file")


def _shapes_job(n: int, row: dict[str, Any], *, where: str, column: str, meaning_column: str) -> Job:
    from reward_service.backends import shapes_decomposer
    from reward_service.backends.shapes_meaning_json import canonical, meaning_from_dict, meaning_from_json
    from reward_service.schema import prompt_key

    prompt, raw = row.get(column), row.get(meaning_column)
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{where}: row {n}: column {column!r} must be a non-empty string, got {prompt!r}")
    try:
        meaning = meaning_from_json(raw) if isinstance(raw, str) else meaning_from_dict(raw)
    except ValueError as e:
        raise InputError(f"{where}: row {n} (prompt {prompt!r}): bad {meaning_column!r}: {e}") from None
    return Job(row=n, prompt_hash=prompt_key(prompt, context=canonical(meaning)),
               make=lambda: shapes_decomposer.decompose(prompt, meaning=meaning))


def plan(path: Path, *, backend: str, column: str, meaning_column: str) -> tuple[DecomposerVersion, list[Job]]:
    """Read and validate every row; the decomposer version and one job per distinct prompt key."""
    if backend in LLM_BACKENDS:
        raise InputError(f"--backend {backend}: the LLM decomposer adapters are not built yet; "
                         "use reward_service.parse.decompose_with_retries with your engine's generate function")
    if backend != "shapes":
        raise InputError(f"--backend {backend!r}: not one of ('shapes', {', '.join(map(repr, LLM_BACKENDS))})")
    from reward_service.backends.shapes_decomposer import VERSION
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    jobs: dict[str, Job] = {}
    for n, row in read_rows(path, [column, meaning_column]):
        job = _shapes_job(n, row, where=str(path), column=column, meaning_column=meaning_column)
        jobs.setdefault(job.prompt_hash, job)
    if not jobs:
        raise InputError(f"{path}: no rows")
    return VERSION, list(jobs.values())


def run(path: Path, *, cache_path: Path, backend: str = "shapes", column: str = "prompt",
        meaning_column: str = "meaning", batch_size: int = 256, progress: bool = True) -> dict[str, Any]:
    """Fill the cache for `path`; returns the counts that `main` prints."""
    version, jobs = plan(path, backend=backend, column=column, meaning_column=meaning_column)
    cache = DecompositionCache(cache_path)
    cached = cache.get_many((j.prompt_hash, version) for j in jobs)
    lookup = cache.stats()
    todo = [j for j in jobs if (j.prompt_hash, str(version)) not in cached]
    added = 0
    batch: list[QuestionSet] = []
    for job in tqdm(todo, desc=f"decompose ({version})", unit="prompt", disable=not progress):
        batch.append(job.make())
        if len(batch) >= batch_size:
            added += cache.put_many(batch)
            batch = []
    added += cache.put_many(batch)
    summary = {"prompts": len(jobs), "already_cached": len(cached), "decomposed": len(todo), "stored": added,
               "hit_rate": lookup.hit_rate, "cache_rows": len(cache), "version": str(version)}
    cache.close()
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reward_service.decompose", description=__doc__.split("\n")[0])
    ap.add_argument("input", type=Path, help="a .jsonl or .parquet file of prompts")
    ap.add_argument("--cache", type=Path, required=True, help="the SQLite cache file (created if missing)")
    ap.add_argument("--backend", default="shapes", help="decomposer: shapes (vllm, hf, openai: not built yet)")
    ap.add_argument("--column", default="prompt", help="column holding the prompt text")
    ap.add_argument("--meaning-column", default="meaning", help="shapes backend: column holding the meaning JSON")
    ap.add_argument("--batch-size", type=int, default=256, help="question sets per cache transaction")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error(f"--batch-size {args.batch_size}: must be >= 1")
    try:
        summary = run(args.input, cache_path=args.cache, backend=args.backend, column=args.column,
                      meaning_column=args.meaning_column, batch_size=args.batch_size, progress=not args.no_progress)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
