"""A shapes `Meaning` as JSON: how a shapes prompt travels in a decomposition input row.

A row for the shapes backend carries the prompt text and `meaning`, the JSON object below
(keys sorted, no whitespace in `canonical`, which is also the shapes backend's prompt-key context):
  {"objects": [{"shape": "circle", "colour": "red" | null, "count": 1}, ...],
   "relation": {"subject": 0, "relation": "left_of", "object": 1} | null,
   "fact": {"kind", "phrase", "value", "question", "answer"} | null,
   "source": {"canvas_size": 32, "background": [255, 255, 255],
              "objects": [{"shape", "colour", "cx", "cy", "size"}, ...]} | null,
   "preserve": [{"shape", "colour", "cx", "cy", "size"}, ...]}
Decoding goes through the shapes dataclasses, so their validation applies; any problem is a
ValueError naming the offending key.
"""
from __future__ import annotations

import json
from typing import Any

from shapes.facts import Fact
from shapes.meaning import Meaning, ObjectSpec, Relation
from shapes.scene import Object, Scene


def _object(o: Object) -> dict[str, Any]:
    return {"shape": o.shape, "colour": o.colour, "cx": o.cx, "cy": o.cy, "size": o.size}


def meaning_to_dict(meaning: Meaning) -> dict[str, Any]:
    rel, fact, src = meaning.relation, meaning.fact, meaning.source
    return {
        "objects": [{"shape": s.shape, "colour": s.colour, "count": s.count} for s in meaning.objects],
        "relation": None if rel is None else {"subject": rel.subject, "relation": rel.relation, "object": rel.object},
        "fact": None if fact is None else {"kind": fact.kind, "phrase": fact.phrase, "value": fact.value,
                                           "question": fact.question, "answer": fact.answer},
        "source": None if src is None else {"canvas_size": src.canvas_size, "background": list(src.background),
                                            "objects": [_object(o) for o in src.objects]},
        "preserve": [_object(o) for o in meaning.preserve],
    }


def canonical(meaning: Meaning) -> str:
    """The meaning as compact, key-sorted JSON (stable: equal meanings give equal strings)."""
    return json.dumps(meaning_to_dict(meaning), sort_keys=True, separators=(",", ":"))


def _build(cls, d: Any, key: str):
    if not isinstance(d, dict):
        raise ValueError(f"meaning.{key}: expected an object, got {type(d).__name__}")
    try:
        return cls(**d)
    except TypeError as e:
        raise ValueError(f"meaning.{key}: {e}") from None
    except ValueError as e:
        raise ValueError(f"meaning.{key}: {e}") from None


def meaning_from_dict(d: Any) -> Meaning:
    """Inverse of meaning_to_dict; a ValueError names the key that is wrong."""
    if not isinstance(d, dict):
        raise ValueError(f"meaning: expected a JSON object, got {type(d).__name__}")
    unknown = set(d) - {"objects", "relation", "fact", "source", "preserve"}
    if unknown:
        raise ValueError(f"meaning: unknown keys {sorted(unknown)}")
    if not isinstance(d.get("objects"), list):
        raise ValueError("meaning.objects: expected a list of object specs")
    specs = tuple(_build(ObjectSpec, s, f"objects[{i}]") for i, s in enumerate(d["objects"]))
    rel = None if d.get("relation") is None else _build(Relation, d["relation"], "relation")
    fact = None if d.get("fact") is None else _build(Fact, d["fact"], "fact")
    source = None
    if d.get("source") is not None:
        src = d["source"]
        if not isinstance(src, dict) or not isinstance(src.get("objects", []), list):
            raise ValueError("meaning.source: expected {canvas_size, background, objects: [...]}")
        objs = tuple(_build(Object, o, f"source.objects[{i}]") for i, o in enumerate(src.get("objects", [])))
        source = _build(Scene, {**src, "objects": objs, "background": tuple(src.get("background", (255, 255, 255)))},
                        "source")
    preserve = d.get("preserve") or []
    if not isinstance(preserve, list):
        raise ValueError("meaning.preserve: expected a list of objects")
    kept = tuple(_build(Object, o, f"preserve[{i}]") for i, o in enumerate(preserve))
    return _build(Meaning, {"objects": specs, "relation": rel, "fact": fact, "source": source, "preserve": kept},
                  "(whole)")


def meaning_from_json(text: str) -> Meaning:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"meaning: not JSON ({e})") from None
    return meaning_from_dict(d)
