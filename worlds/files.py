"""Prompt files: read, checked row by row, and served as a seeded stream.

Formats (by suffix):
    .txt        one prompt per line
    .jsonl      one JSON object per line with a prompt field (`column`, default "prompt"); GenEval's
                evaluation_metadata.jsonl and Flow-GRPO's metadata lines are read as they are: the other
                fields (tag, include, exclude, ...) travel with the prompt as metadata, and `category`
                (default "tag") names the field reports group by
    .csv        a header row and a prompt column (stdlib csv: errors name the line)
    .parquet    a prompt column (pyarrow); errors name the row

A bad row (empty prompt, not UTF-8, not a JSON object, missing field, longer than `max_tokens`) is a
PromptFileError naming file and line, or, with on_bad_row="skip", skipped and counted by reason.
"""
from __future__ import annotations

import csv
import io
import json
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worlds.records import PromptRecord, normalised

FORMATS: tuple[str, ...] = (".txt", ".jsonl", ".csv", ".parquet")
BAD_ROW_POLICIES: tuple[str, ...] = ("error", "skip")


class PromptFileError(ValueError):
    """A prompt file or one of its rows is unusable; the message names the file and the line (or row)."""


@dataclass(kw_only=True)
class PromptFile:
    """What a prompt file gave: its usable rows in file order, and the skipped ones by reason."""
    path: Path
    records: list[PromptRecord]
    skipped: Counter = field(default_factory=Counter)


class _BadRow(Exception):
    pass


def _rows(path: Path, column: str) -> Iterator[tuple[str, Any]]:
    """(where, row) per data row; row is a dict of fields, or a _BadRow to report."""
    suffix = path.suffix.lower()
    if suffix in (".txt", ".jsonl"):
        lines = path.read_bytes().split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()                      # the final newline ends the last line, it is not a row
        for n, raw in enumerate(lines, start=1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8").rstrip("\r")
            except UnicodeDecodeError as e:
                yield where, _BadRow(f"not UTF-8 ({e.reason} at byte {e.start})")
                continue
            if suffix == ".txt":
                yield where, {column: line}
                continue
            if not line.strip():
                yield where, _BadRow("empty line")
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, _BadRow(f"not JSON ({e.msg} at column {e.colno})")
                continue
            yield where, row if isinstance(row, dict) else _BadRow(f"a JSON {type(row).__name__}, not an object")
    elif suffix == ".csv":
        with path.open("rb") as f:
            reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline=""))
            if reader.fieldnames is None or column not in reader.fieldnames:
                raise PromptFileError(f"{path}: no {column!r} column (header: {reader.fieldnames})")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                bad = [k for k, v in row.items() if isinstance(v, str) and _has_surrogates(v)]
                yield where, _BadRow(f"not UTF-8 (field {bad[0]!r})") if bad else row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if column not in table.column_names:
            raise PromptFileError(f"{path}: no {column!r} column (columns: {table.column_names})")
        for n, row in enumerate(table.to_pylist(), start=1):
            where = f"{path}: row {n}"
            value = row.get(column)
            if isinstance(value, bytes):
                try:
                    row = {**row, column: value.decode("utf-8")}
                except UnicodeDecodeError as e:
                    yield where, _BadRow(f"not UTF-8 ({e.reason} at byte {e.start})")
                    continue
            yield where, row
    else:
        raise PromptFileError(f"{path}: unknown prompt file format {suffix!r}; use one of {FORMATS}")


def _has_surrogates(s: str) -> bool:
    return any("\udc80" <= c <= "\udcff" for c in s)


def read_prompt_file(path: str | Path, *, column: str = "prompt", category: str = "tag", on_bad_row: str = "error",
                     max_tokens: int = 0, count_tokens: Callable[[str], int] | None = None) -> PromptFile:
    """Every usable row of a prompt file as a PromptRecord (id "<file name>:<line>")."""
    path = Path(path)
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_row={on_bad_row!r}: not one of {BAD_ROW_POLICIES}")
    if not path.is_file():
        raise PromptFileError(f"{path}: no such prompt file")
    out = PromptFile(path=path, records=[])
    for where, row in _rows(path, column):
        try:
            if isinstance(row, _BadRow):
                raise row
            text = row.get(column)
            if text is None:
                raise _BadRow(f"no {column!r} field")
            if not isinstance(text, str):
                raise _BadRow(f"{column!r} is a {type(text).__name__}, not text")
            if not text.strip():
                raise _BadRow("empty prompt")
            if max_tokens and count_tokens is not None and (n := count_tokens(text)) > max_tokens:
                raise _BadRow(f"prompt of {n} tokens is longer than the {max_tokens} the model's context allows")
        except _BadRow as bad:
            reason = str(bad)
            if on_bad_row == "error":
                raise PromptFileError(f"{where}: {reason} (data.on_bad_row=skip skips such rows)") from None
            out.skipped[reason.split(" (")[0]] += 1
            continue
        line = where.rsplit(":", 1)[-1].strip().removeprefix("row ")
        meta = {k: v for k, v in row.items() if k != column}
        out.records.append(PromptRecord(id=f"{path.name}:{line}", text=text.strip(),
                                        category=str(meta.get(category, "") or "") if category else "",
                                        metadata=meta, origin=where))
    if not out.records:
        raise PromptFileError(f"{path}: no usable prompt (skipped: {dict(out.skipped) or 'none'})")
    return out


def check_disjoint(train: list[PromptRecord], heldout: list[PromptRecord]) -> None:
    """PromptFileError naming both places when a held-out prompt is also a training prompt."""
    held = {normalised(r.text): r for r in heldout}
    for r in train:
        if normalised(r.text) in held:
            raise PromptFileError(f"{r.origin}: {r.text!r} is a held-out prompt ({held[normalised(r.text)].origin}); "
                                  "training on it would leak the held-out set")


class ShuffledStream:
    """An endless, seeded stream over a finite list of prompts: epoch e is its own permutation
    (seeded by (seed, e)); `state()` is (epoch, position), and `restore` continues exactly there."""

    def __init__(self, records: list[PromptRecord], *, seed: int, shuffle: bool = True, name: str = "prompts") -> None:
        if not records:
            raise ValueError(f"{name}: no prompts to stream")
        self.records, self.seed, self.shuffle, self.name = list(records), seed, shuffle, name
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.records)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next(self) -> PromptRecord:
        if self.position == len(self.records):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        record = self.records[self._order[self.position]]
        self.position += 1
        return record

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, Any]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if not 0 <= position <= len(self.records) or epoch < 0:
            raise ValueError(f"{self.name}: cannot restore to epoch {epoch} position {position} "
                             f"of {len(self.records)} prompts")
        self.epoch, self.position, self._order = epoch, position, self._permutation(epoch)
