"""The prompt data's configuration (the `data` section of a run)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from worlds.files import BAD_ROW_POLICIES


class DataConfigError(ValueError):
    """A bad `data` value; the message names the key."""


@dataclass
class SourceConfig:
    """Where prompts come from: a prompt file, or a world plugin by name."""
    source: str = ""                 # a file (.txt .jsonl .csv .parquet) or a world (entry point `alphagrpo.worlds`,
                                     # e.g. "shapes"); worlds.load.build_sources decides which
    column: str = "prompt"           # files: the prompt's field (.jsonl) or column (.csv, .parquet)
    category: str = "tag"            # files: the field reports group by (GenEval's "tag"); "" = none
    options: dict[str, Any] = field(default_factory=dict)   # a world's own options (shapes: families, ...)


def _shapes_train() -> SourceConfig:
    return SourceConfig(source="shapes", options={"families": [
        "single_object", "two_objects", "counting", "colors", "position", "color_attr", "implicit_color",
        "implicit_count"]})


@dataclass
class DataConfig:
    train: SourceConfig = field(default_factory=_shapes_train)
    heldout: SourceConfig = field(default_factory=lambda: SourceConfig(source="shapes"))   # "" = none
    group_size: int = 8              # G: samples per prompt
    shuffle: bool = True             # files: a new seeded permutation each epoch (off: file order)
    on_bad_row: str = "error"        # files: "error" (names file and line) or "skip" (counted, reported)

    def validate(self, prefix: str = "data") -> "DataConfig":
        if self.group_size < 2:
            raise DataConfigError(f"{prefix}.group_size={self.group_size}: must be >= 2")
        if self.on_bad_row not in BAD_ROW_POLICIES:
            raise DataConfigError(f"{prefix}.on_bad_row={self.on_bad_row!r}: not one of {BAD_ROW_POLICIES}")
        if not self.train.source:
            raise DataConfigError(f"{prefix}.train.source: empty; name a prompt file or a world (e.g. shapes)")
        return self
