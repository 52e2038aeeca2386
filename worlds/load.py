"""Building a run's prompt sources from its `data` config: prompt files or world plugins.

    source "prompts.jsonl"  a file (worlds.files): read and checked once, streamed seeded; no judge
    source "shapes"         a world registered under the `alphagrpo.worlds` entry-point group: its
                            training stream, its held-out prompts and its judge

The held-out prompts are read first; a training file containing one is refused (naming both
places), and a world's endless stream is told to leave them out.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

from worlds.base import ENTRY_POINT_GROUP, Judge, PromptSource, World
from worlds.config import DataConfig, DataConfigError, SourceConfig
from worlds.files import FORMATS, ShuffledStream, check_disjoint, read_prompt_file
from worlds.records import PromptRecord, normalised


@dataclass(kw_only=True)
class Sources:
    """What a run draws from. `train` is the stream at the run's seed; `stream(seed)` makes another
    independent one over the same prompts (e.g. one per task)."""
    train: PromptSource
    stream: Callable[[int], PromptSource]
    heldout: list[PromptRecord]
    judges: dict[str, Judge] = field(default_factory=dict)      # world name -> its judge
    skipped: dict[str, Counter] = field(default_factory=dict)   # file -> bad rows skipped, by reason


def registered_worlds() -> dict[str, object]:
    """World plugins installed in this environment, by name."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_world(name: str, *, key: str) -> World:
    found = registered_worlds()
    if name not in found:
        raise DataConfigError(f"{key}={name!r}: neither a prompt file ({'/'.join(FORMATS)}) nor a registered "
                              f"world ({ENTRY_POINT_GROUP}: {sorted(found)})")
    return found[name].load()()


def is_file(spec: SourceConfig) -> bool:
    return Path(spec.source).suffix.lower() in FORMATS


def build_sources(data: DataConfig, *, seed: int, resolve: Callable[[str, str], Path] = lambda p, k: Path(p),
                  count_tokens: Callable[[str], int] | None = None, max_tokens: int = 0) -> Sources:
    """The run's training stream, held-out prompts and judges. `resolve(path, key)` finds a file named in
    the config (relative to the repository when not found as given); `count_tokens` / `max_tokens`
    refuse (or skip) prompts that would not fit the model's context."""
    data.validate()
    skipped: dict[str, Counter] = {}
    judges: dict[str, Judge] = {}

    def read(spec: SourceConfig, key: str):
        f = read_prompt_file(resolve(spec.source, key), column=spec.column, category=spec.category,
                             on_bad_row=data.on_bad_row, max_tokens=max_tokens, count_tokens=count_tokens)
        if f.skipped:
            skipped[str(f.path)] = f.skipped
        return f.records

    def world(spec: SourceConfig, key: str) -> World:
        w = load_world(spec.source, key=key)
        j = w.judge()
        if j is not None:
            judges[w.name] = j
        return w

    heldout: list[PromptRecord] = []
    if data.heldout.source:
        spec = data.heldout
        heldout = (read(spec, "data.heldout.source") if is_file(spec)
                   else world(spec, "data.heldout.source").heldout_prompts(dict(spec.options)))
    spec = data.train
    if is_file(spec):
        records = read(spec, "data.train.source")
        check_disjoint(records, heldout)

        def stream(s: int) -> PromptSource:
            return ShuffledStream(records, seed=s, shuffle=data.shuffle, name=str(spec.source))
    else:
        w, exclude = world(spec, "data.train.source"), frozenset(normalised(r.text) for r in heldout)

        def stream(s: int) -> PromptSource:
            return w.train_source(dict(spec.options), seed=s, exclude=exclude)
    return Sources(train=stream(seed), stream=stream, heldout=heldout, judges=judges, skipped=skipped)
