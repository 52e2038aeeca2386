"""The question set of one prompt: DVReward's decomposition, validated on construction.

A `QuestionSet` holds, for one prompt, DSG-style yes/no questions of two kinds:
  semantic  tagged by category (SEMANTIC_CATEGORIES), with optional parent ids: "is the circle red?"
            depends on "is there a circle?" (a child is only meaningful when its parents hold);
  quality   tagged by aspect (QUALITY_ASPECTS), positively phrased ("are the edges clean?").
It is versioned by the `DecomposerVersion` (backend name + prompt-template version) that produced it,
and keyed by `prompt_key(prompt, context=...)`, a hash of the prompt text plus whatever else the
decomposition depends on (the shapes backend: the prompt's structured meaning, since an edit
instruction means different things on different source scenes).

Constructing a `QuestionSet` validates it (empty set, duplicate ids, unknown kind/category, dangling
or self parent ids, parent cycles) and raises `QuestionSetError` naming the prompt, so a set that
exists is a valid one. Categories and aspects are the method's (docs: method-facts.md, DVReward).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1
KINDS: tuple[str, ...] = ("semantic", "quality")
SEMANTIC_CATEGORIES: tuple[str, ...] = ("style", "environment", "viewpoint", "existence", "count",
                                        "attribute", "action", "spatial", "text", "negative")
QUALITY_ASPECTS: tuple[str, ...] = ("geometry", "anatomy", "texture", "coherence", "lighting", "physics",
                                    "legibility", "aesthetics")
CATEGORIES: dict[str, tuple[str, ...]] = {"semantic": SEMANTIC_CATEGORIES, "quality": QUALITY_ASPECTS}


class QuestionSetError(ValueError):
    """A question set that breaks the schema; the message names the prompt and the problem."""


def prompt_key(prompt: str, *, context: str = "") -> str:
    """sha256 hex of the prompt text and its decomposition context (e.g. canonical meaning JSON)."""
    return hashlib.sha256(f"{prompt}\x00{context}".encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class DecomposerVersion:
    """Which decomposer produced a set; part of the cache key (a new template = a new decomposition)."""
    name: str                   # backend: "shapes", "vllm:<model>", "openai:<model>", ...
    template_version: str       # reward_service.templates.TEMPLATE_VERSION, or the backend's own

    def __post_init__(self) -> None:
        for key in ("name", "template_version"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value or "@" in value:
                raise ValueError(f"DecomposerVersion.{key}={value!r}: must be a non-empty string without '@'")

    def __str__(self) -> str:
        return f"{self.name}@{self.template_version}"

    @classmethod
    def parse(cls, text: str) -> "DecomposerVersion":
        name, sep, template = text.partition("@")
        if not sep:
            raise ValueError(f"DecomposerVersion.parse: {text!r} is not 'name@template_version'")
        return cls(name=name, template_version=template)


@dataclass(frozen=True, kw_only=True)
class Question:
    """One yes/no question about the image."""
    id: str                                  # unique within its set ("e0", "q3", ...)
    text: str                                # what the verifier is asked
    kind: str                                # "semantic" | "quality"
    category: str                            # semantic: SEMANTIC_CATEGORIES; quality: QUALITY_ASPECTS
    parents: tuple[str, ...] = ()            # ids this question depends on (semantic DSG dependencies)
    atom: dict[str, Any] | None = field(default=None, compare=True, hash=False)
    # machine-readable form for programmatic verifiers (shapes: AtomicQuestion fields / quality key)

    def __post_init__(self) -> None:
        object.__setattr__(self, "parents", tuple(self.parents))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "text": self.text, "kind": self.kind, "category": self.category,
                               "parents": list(self.parents)}
        if self.atom is not None:
            out["atom"] = self.atom
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Question":
        return cls(id=d["id"], text=d["text"], kind=d["kind"], category=d["category"],
                   parents=tuple(d.get("parents", ())), atom=d.get("atom"))


@dataclass(frozen=True, kw_only=True)
class QuestionSet:
    """All questions for one prompt, with where they came from; valid by construction."""
    prompt: str                              # the prompt text the questions were made from
    prompt_hash: str                         # prompt_key(prompt, context=...): the cache key's first half
    version: DecomposerVersion               # the cache key's second half
    questions: tuple[Question, ...]          # semantic and quality, parents before children
    notes: tuple[str, ...] = ()              # repairs applied while parsing (empty for exact backends)

    def __post_init__(self) -> None:
        object.__setattr__(self, "questions", tuple(self.questions))
        object.__setattr__(self, "notes", tuple(self.notes))
        validate(self)

    @property
    def semantic(self) -> tuple[Question, ...]:
        return tuple(q for q in self.questions if q.kind == "semantic")

    @property
    def quality(self) -> tuple[Question, ...]:
        return tuple(q for q in self.questions if q.kind == "quality")

    def topological_order(self) -> list[int]:
        """Question indices with every parent before its children (stable: list order otherwise)."""
        index = {q.id: i for i, q in enumerate(self.questions)}
        done: set[int] = set()
        order: list[int] = []

        def visit(i: int) -> None:          # acyclic by validation; depth <= number of questions
            if i in done:
                return
            done.add(i)
            for p in self.questions[i].parents:
                visit(index[p])
            order.append(i)

        for i in range(len(self.questions)):
            visit(i)
        return order

    def to_json(self) -> str:
        return json.dumps({"schema": SCHEMA_VERSION, "prompt": self.prompt, "prompt_hash": self.prompt_hash,
                           "version": str(self.version), "questions": [q.to_dict() for q in self.questions],
                           "notes": list(self.notes)}, sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "QuestionSet":
        """Inverse of to_json; a QuestionSetError names what is wrong with stored text."""
        try:
            d = json.loads(text)
            if d.get("schema") != SCHEMA_VERSION:
                raise QuestionSetError(f"schema={d.get('schema')!r}, expected {SCHEMA_VERSION}")
            return cls(prompt=d["prompt"], prompt_hash=d["prompt_hash"], version=DecomposerVersion.parse(d["version"]),
                       questions=tuple(Question.from_dict(q) for q in d["questions"]), notes=tuple(d["notes"]))
        except QuestionSetError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise QuestionSetError(f"QuestionSet.from_json: not a stored question set ({type(e).__name__}: {e})") from e


def _find_cycle(questions: tuple[Question, ...]) -> list[str] | None:
    """A parent cycle as a list of ids, or None (iterative DFS, colours white/grey/black)."""
    parents = {q.id: q.parents for q in questions}
    state: dict[str, int] = {}
    for root in parents:
        if state.get(root):
            continue
        stack, path = [(root, iter(parents[root]))], [root]
        state[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(parents[nxt])))
                path.append(nxt)
    return None


def validate(qs: QuestionSet) -> None:
    """Raise QuestionSetError naming the prompt and the first problem found."""
    def fail(msg: str) -> None:
        raise QuestionSetError(f"question set for prompt {qs.prompt!r} ({qs.version}): {msg}")

    if not isinstance(qs.prompt, str) or not isinstance(qs.prompt_hash, str) or not qs.prompt_hash:
        fail("prompt and prompt_hash must be strings (prompt_hash non-empty)")
    if not qs.questions:
        fail("no questions (an empty set would silently score every image 1.0)")
    seen: set[str] = set()
    for q in qs.questions:
        if not isinstance(q, Question):
            fail(f"{q!r} is not a Question")
        if not isinstance(q.id, str) or not q.id:
            fail(f"question id {q.id!r} must be a non-empty string")
        if q.id in seen:
            fail(f"duplicate question id {q.id!r}")
        seen.add(q.id)
        if not isinstance(q.text, str) or not q.text.strip():
            fail(f"question {q.id!r} has no text")
        if q.kind not in KINDS:
            fail(f"question {q.id!r}: kind={q.kind!r} is not one of {KINDS}")
        if q.category not in CATEGORIES[q.kind]:
            fail(f"question {q.id!r}: unknown {q.kind} category {q.category!r} (known: {CATEGORIES[q.kind]})")
        if q.atom is not None and not isinstance(q.atom, dict):
            fail(f"question {q.id!r}: atom must be a dict or None, got {type(q.atom).__name__}")
    for q in qs.questions:
        for p in q.parents:
            if p == q.id:
                fail(f"question {q.id!r} is its own parent")
            if p not in seen:
                fail(f"question {q.id!r}: dangling parent id {p!r}")
    cycle = _find_cycle(qs.questions)
    if cycle:
        fail("parent cycle " + " -> ".join(cycle))
