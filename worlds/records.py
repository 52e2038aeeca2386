"""The prompt record that crosses every boundary, whatever world or file it came from."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class PromptRecord:
    """One prompt to draw."""
    id: str                          # stable: a world's content id, or "<file stem>:<line>" for a file row
    text: str                        # what the user asks for
    category: str = ""               # reporting bucket (GenEval's tag, a shapes family); "" = none
    metadata: Mapping[str, Any] = field(default_factory=dict)   # the row's other fields, as given
    meaning: Any = None              # a world's structured meaning (its judge and reward backend read it)
    world: str = ""                  # the world whose judge can check it ("" = none: a prompt file)
    origin: str = ""                 # where it came from, for errors ("prompts.jsonl:12")


def normalised(text: str) -> str:
    """The form two prompts are compared in (held-out overlap): case-folded, single spaces."""
    return " ".join(text.casefold().split())
