"""Offline decomposition: fill the cache for a prompt file before training.

    python -m reward_service.decompose INPUT.parquet|INPUT.jsonl --cache PATH [--backend shapes]
                                       [--option KEY=VALUE ...] [--column prompt]
                                       [--meaning-column meaning] [--batch-size 256]

Backends: shapes (exact, needs each row's meaning), vllm, hf, openai (an LLM reads the prompt text;
`--option` sets their options, e.g. `--option model=Qwen/Qwen2.5-7B-Instruct --option
max_model_len=8192`; a VALUE that parses as JSON is read as JSON, anything else is a string;
reward_service.backends.llm_options lists them). An LLM engine is only loaded when some prompt
is not cached yet.

Rows name the prompt text in `--column`. The shapes backend also needs the prompt's meaning in
`--meaning-column`: a JSON string (jsonl: also an inline object) in the format of
`reward_service.backends.shapes_meaning_json` — a string column in parquet, since a meaning's
`fact.value` is a colour name or a count and Arrow structs cannot hold both. Steps:
  1. read and validate every row (a bad row stops the run before anything is written, with an error
     naming the file and the row);
  2. look every key up in the cache (one query per 500 keys) and report the hit rate;
  3. decompose the missing prompts `--batch-size` at a time with a progress bar (one
     `decompose_batch` call per batch: one engine call per retry round for LLM backends), storing
     each batch in one transaction, so a crash leaves only complete rows behind and a rerun resumes
     where it stopped. A prompt an LLM cannot decompose within its retry budget stops the run with
     the error naming it (exit 1); the batches before it stay stored.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from reward_service.backends import BackendError, BackendSpec, DecomposeRequest, build_decomposer
from reward_service.cache import DecompositionCache
from reward_service.parse import DecompositionError
from reward_service.schema import DecomposerVersion, prompt_key

LLM_BACKENDS = ("vllm", "hf", "openai")
BACKENDS = ("shapes",) + LLM_BACKENDS


class InputError(ValueError):
    """A bad input file, row or backend option; the message names the file and the row, or the option."""


@dataclass(frozen=True, kw_only=True)
class Job:
    """One prompt to decompose: where it came from, its key and what the decomposer is given."""
    row: int                                   # 1-based row (jsonl: line) number in the input
    prompt_hash: str
    request: DecomposeRequest


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


def _prompt(n: int, row: dict[str, Any], *, where: str, column: str) -> str:
    prompt = row.get(column)
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{where}: row {n}: column {column!r} must be a non-empty string, got {prompt!r}")
    return prompt


def _shapes_job(n: int, row: dict[str, Any], *, where: str, column: str, meaning_column: str) -> Job:
    from reward_service.backends.shapes_meaning_json import canonical, meaning_from_dict, meaning_from_json

    prompt, raw = _prompt(n, row, where=where, column=column), row.get(meaning_column)
    try:
        meaning = meaning_from_json(raw) if isinstance(raw, str) else meaning_from_dict(raw)
    except ValueError as e:
        raise InputError(f"{where}: row {n} (prompt {prompt!r}): bad {meaning_column!r}: {e}") from None
    return Job(row=n, prompt_hash=prompt_key(prompt, context=canonical(meaning)),
               request=DecomposeRequest(prompt=prompt, meaning=meaning))


def _llm_job(n: int, row: dict[str, Any], *, where: str, column: str, meaning_column: str) -> Job:
    prompt = _prompt(n, row, where=where, column=column)       # LLM backends read the text alone
    return Job(row=n, prompt_hash=prompt_key(prompt), request=DecomposeRequest(prompt=prompt))


def version_of(spec: BackendSpec) -> DecomposerVersion:
    """The decomposer's cache version, with its options checked, without loading any model."""
    if spec.name not in BACKENDS:
        raise InputError(f"--backend {spec.name!r}: not one of {BACKENDS}")
    try:
        if spec.name == "shapes":
            if spec.options:
                raise BackendError(f"backend 'shapes' takes no options, got {sorted(spec.options)}")
            from reward_service.backends.shapes_decomposer import VERSION
            return VERSION
        from reward_service.backends.llm_options import decomposer_version
        return decomposer_version(spec)
    except BackendError as e:
        raise InputError(f"--backend {spec.name}: {e}") from None


def plan(path: Path, *, spec: BackendSpec, column: str, meaning_column: str) -> tuple[DecomposerVersion, list[Job]]:
    """Check the backend options, read and validate every row; the decomposer version and one job
    per distinct prompt key."""
    version = version_of(spec)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    make_job = _shapes_job if spec.name == "shapes" else _llm_job
    columns = [column, meaning_column] if spec.name == "shapes" else [column]
    jobs: dict[str, Job] = {}
    for n, row in read_rows(path, columns):
        job = make_job(n, row, where=str(path), column=column, meaning_column=meaning_column)
        jobs.setdefault(job.prompt_hash, job)
    if not jobs:
        raise InputError(f"{path}: no rows")
    return version, list(jobs.values())


def _checked(sets: list, batch: list[Job], version: DecomposerVersion) -> list:
    """The decomposer's sets, refused if one is keyed differently from its job (it would never hit)."""
    for job, qs in zip(batch, sets, strict=True):
        if (qs.prompt_hash, str(qs.version)) != (job.prompt_hash, str(version)):
            raise RuntimeError(f"row {job.row} (prompt {job.request.prompt!r}): the decomposer keyed its set "
                               f"({qs.prompt_hash[:12]}..., {qs.version}), expected ({job.prompt_hash[:12]}..., {version})")
    return sets


def run(path: Path, *, cache_path: Path, backend: str = "shapes", options: dict[str, Any] | None = None,
        column: str = "prompt", meaning_column: str = "meaning", batch_size: int = 256,
        progress: bool = True) -> dict[str, Any]:
    """Fill the cache for `path`; returns the counts that `main` prints."""
    spec = BackendSpec(name=backend, options=dict(options or {}))
    version, jobs = plan(path, spec=spec, column=column, meaning_column=meaning_column)
    cache = DecompositionCache(cache_path)
    try:
        cached = cache.get_many((j.prompt_hash, version) for j in jobs)
        lookup = cache.stats()
        todo = [j for j in jobs if (j.prompt_hash, str(version)) not in cached]
        decomposer = build_decomposer(spec) if todo else None      # no engine when everything is cached
        added = 0
        with tqdm(total=len(todo), desc=f"decompose ({version})", unit="prompt", disable=not progress) as bar:
            for i in range(0, len(todo), batch_size):
                batch = todo[i:i + batch_size]
                added += cache.put_many(_checked(decomposer.decompose_batch([j.request for j in batch]), batch,
                                                 version))
                bar.update(len(batch))
        return {"prompts": len(jobs), "already_cached": len(cached), "decomposed": len(todo), "stored": added,
                "hit_rate": lookup.hit_rate, "cache_rows": len(cache), "version": str(version)}
    finally:
        cache.close()


def parse_option(text: str) -> tuple[str, Any]:
    """'key=value' -> (key, JSON value, or the string when it is not JSON)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise InputError(f"--option {text!r}: expected KEY=VALUE")
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reward_service.decompose", description=__doc__.split("\n")[0])
    ap.add_argument("input", type=Path, help="a .jsonl or .parquet file of prompts")
    ap.add_argument("--cache", type=Path, required=True, help="the SQLite cache file (created if missing)")
    ap.add_argument("--backend", default="shapes", help=f"decomposer: one of {', '.join(BACKENDS)}")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="an LLM backend option (repeatable), e.g. model=Qwen/Qwen2.5-7B-Instruct")
    ap.add_argument("--column", default="prompt", help="column holding the prompt text")
    ap.add_argument("--meaning-column", default="meaning", help="shapes backend: column holding the meaning JSON")
    ap.add_argument("--batch-size", type=int, default=256, help="question sets per cache transaction")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error(f"--batch-size {args.batch_size}: must be >= 1")
    try:
        options = dict(parse_option(o) for o in args.option)
        summary = run(args.input, cache_path=args.cache, backend=args.backend, options=options, column=args.column,
                      meaning_column=args.meaning_column, batch_size=args.batch_size, progress=not args.no_progress)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DecompositionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
