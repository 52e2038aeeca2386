"""Reading an LLM's decomposition reply into a valid `QuestionSet`, repairing what can be repaired.

Repairs, each recorded in `QuestionSet.notes` so the audit shows what was changed:
  text      code fences and prose around the JSON; trailing commas; smart quotes; single-quoted
            (Python-style) literals and True/False/None; a reply cut off mid-list (kept up to the
            last complete item); a top-level {"questions": [...]} wrapper; bare strings as items;
  fields    missing id (-> q<n>), duplicate id (renamed), question under "text"/"q"; missing or
            unknown kind/category (inferred from the category, else the kind's default); parents
            given as one id, an int, "q1, q2" or DSG's 0 for "none";
  graph     dangling and self parents dropped; edges that would close a parent cycle dropped.
Items without usable question text are dropped. If nothing usable is left, more than MAX_QUESTIONS
are, or the text holds no JSON at all, `DecompositionError` names the prompt. Nothing else escapes `parse_decomposition`.
`decompose_with_retries` asks an LLM again (telling it what was wrong) within a budget.
"""
from __future__ import annotations

import ast
import json
import re
from typing import Any, Callable

from reward_service.schema import (CATEGORIES, QUALITY_ASPECTS, SEMANTIC_CATEGORIES, DecomposerVersion, Question,
                                   QuestionSet, QuestionSetError, prompt_key)
from reward_service.templates import decomposition_request

DEFAULT_CATEGORY = {"semantic": "attribute", "quality": "aesthetics"}
CATEGORY_SYNONYMS = {
    "entity": "existence", "entities": "existence", "object": "existence", "objects": "existence",
    "exists": "existence", "presence": "existence", "counting": "count", "number": "count",
    "quantity": "count", "numeracy": "count", "attributes": "attribute", "color": "attribute",
    "colour": "attribute", "shape": "attribute", "material": "attribute", "size": "attribute",
    "relation": "spatial", "relations": "spatial", "position": "spatial", "spatial relation": "spatial",
    "layout": "spatial", "ocr": "text", "text rendering": "text", "typography": "text", "negation": "negative",
    "absence": "negative", "background": "environment", "scene": "environment", "camera": "viewpoint",
    "perspective": "viewpoint", "activity": "action", "verb": "action", "realism": "aesthetics",
    "structure": "geometry", "shape quality": "geometry", "consistency": "coherence", "artifacts": "coherence",
    "readability": "legibility", "illumination": "lighting",
}
KIND_SYNONYMS = {"semantic": "semantic", "semantics": "semantic", "content": "semantic", "sem": "semantic",
                 "alignment": "semantic", "quality": "quality", "visual": "quality", "visual quality": "quality",
                 "aesthetic": "quality", "qual": "quality"}
MAX_REPLY_CHARS = 200_000
MAX_QUESTIONS = 64          # DSG/DPG-Bench sets stay well below; more means a runaway reply (and 64+ VLM calls)


class DecompositionError(ValueError):
    """A decomposition that could not be parsed or repaired; names the prompt."""

    def __init__(self, prompt: str, reason: str) -> None:
        super().__init__(f"decomposition of prompt {prompt!r} failed: {reason}")
        self.prompt = prompt
        self.reason = reason

    def __reduce__(self):           # picklable (it crosses process boundaries from reward actors)
        return type(self), (self.prompt, self.reason)


# ---- text -> Python value -------------------------------------------------------------------------

def _outside_strings(text: str, fn: Callable[[str], str], quotes: str) -> str:
    """Apply `fn` to the parts of `text` that are not inside quoted strings."""
    out, buf, i, quote = [], [], 0, None
    while i < len(text):
        c = text[i]
        if quote is None and c in quotes:
            out.append(fn("".join(buf)))
            buf, quote = [c], c
        elif quote is not None:
            buf.append(c)
            if c == "\\" and i + 1 < len(text):
                buf.append(text[i + 1])
                i += 1
            elif c == quote:
                out.append("".join(buf))
                buf, quote = [], None
        else:
            buf.append(c)
        i += 1
    out.append(fn("".join(buf)) if quote is None else "".join(buf))
    return "".join(out)


def _no_trailing_commas(s: str) -> str:
    return re.sub(r",\s*([\]}])", r"\1", s)


def _pythonise(s: str) -> str:
    s = re.sub(r"\btrue\b", "True", s)
    s = re.sub(r"\bfalse\b", "False", s)
    return re.sub(r"\bnull\b", "None", s)


def _candidates(text: str) -> tuple[list[str], list[str], list[str]]:
    """Substrings to try, in order: the whole text, the fenced block and the outermost [...]; the same
    when cut off mid-list (everything from the first '['); then the outermost {...}."""
    text = text.replace("\u201c", '"').replace("\u201d", '"').replace("\u2018", "'").replace("\u2019", "'")
    lists, tails, rest = [text.strip()], [], []
    fence = re.search(r"```(?:json|JSON|python)?\s*(.*?)(?:```|$)", text, flags=re.S)
    if fence:
        lists.append(fence.group(1).strip())
        tails.append(fence.group(1).strip())
    start, end = text.find("["), text.rfind("]")
    if start != -1:
        lists.append(text[start:end + 1] if end > start else text[start:])
        tails.append(text[start:])
    start, end = text.find("{"), text.rfind("}")
    if start != -1:
        rest.append(text[start:end + 1] if end > start else text[start:])
    return tuple(list(dict.fromkeys(c for c in group if c)) for group in (lists, tails, rest))


def _exact_attempts(candidate: str) -> list[tuple[str, Callable[[], Any]]]:
    def python_style() -> Any:
        no_commas = _outside_strings(candidate, _no_trailing_commas, "\"'")
        return ast.literal_eval(_outside_strings(no_commas, _pythonise, "\"'"))
    return [("", lambda: json.loads(candidate)),
            ("removed trailing commas", lambda: json.loads(_outside_strings(candidate, _no_trailing_commas, '"'))),
            ("read Python-style literals", python_style)]


def _cut_attempts(candidate: str) -> list[tuple[str, Callable[[], Any]]]:
    if not candidate.startswith("[") or "}" not in candidate:
        return []
    cut = _outside_strings(candidate[:candidate.rfind("}") + 1] + "]", _no_trailing_commas, '"')
    return [("reply was cut off; kept the complete items", lambda: json.loads(cut))]


def load_lenient(text: str) -> tuple[Any, list[str]]:
    """The JSON value in an LLM reply and the repairs needed; ValueError when there is none."""
    if len(text) > MAX_REPLY_CHARS:
        raise ValueError(f"reply is {len(text)} characters (limit {MAX_REPLY_CHARS})")
    lists, tails, rest = _candidates(text)
    attempts = ([a for c in lists for a in _exact_attempts(c)] + [a for c in tails for a in _cut_attempts(c)]
                + [a for c in rest for a in _exact_attempts(c)])
    for note, attempt in attempts:
        try:
            value = attempt()
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, (list, tuple, dict)):
            return value, ([note] if note else [])
    raise ValueError("no JSON list found in the reply")


# ---- Python value -> questions -------------------------------------------------------------------

def _items(value: Any, notes: list[str]) -> list[Any]:
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, (list, tuple))]
        inner = value.get("questions", lists[0] if len(lists) == 1 else None)
        if not isinstance(inner, (list, tuple)):
            raise ValueError(f"a JSON object with keys {sorted(map(str, value))[:8]} and no question list")
        notes.append("unwrapped the question list from an object")
        value = inner
    return list(value)


def _label(raw: Any) -> str | None:
    return raw.strip().lower().replace("_", " ") if isinstance(raw, str) and raw.strip() else None


def _kind_and_category(item: dict, qid: str, notes: list[str]) -> tuple[str, str]:
    kind = KIND_SYNONYMS.get(_label(item.get("kind")) or "")
    raw_cat = next((item[k] for k in ("category", "aspect", "type", "tag") if k in item), None)
    cat = _label(raw_cat)
    cat = CATEGORY_SYNONYMS.get(cat, cat) if cat else None
    if cat in SEMANTIC_CATEGORIES and cat not in QUALITY_ASPECTS:
        inferred = "semantic"
    elif cat in QUALITY_ASPECTS:
        inferred = "quality"
    else:
        inferred = None
    if inferred and kind and kind != inferred:
        notes.append(f"{qid}: kind {kind!r} contradicts category {cat!r}; kept the category")
    kind = inferred or kind
    if kind is None:
        notes.append(f"{qid}: no usable kind; assumed semantic")
        kind = "semantic"
    if cat not in CATEGORIES[kind]:
        notes.append(f"{qid}: unknown category {str(raw_cat)[:40]!r}; used {DEFAULT_CATEGORY[kind]!r}")
        cat = DEFAULT_CATEGORY[kind]
    return kind, cat


def _parent_ids(raw: Any, qid: str, notes: list[str]) -> list[str]:
    if raw is None or raw == 0 or raw == "0" or raw == "":
        return []
    if isinstance(raw, (str, int)) and not isinstance(raw, bool):
        raw = re.split(r"[,\s]+", raw.strip()) if isinstance(raw, str) else [raw]
    if not isinstance(raw, (list, tuple)):
        notes.append(f"{qid}: unreadable parents {str(raw)[:40]!r}; dropped")
        return []
    out = []
    for p in raw:
        if isinstance(p, (str, int)) and not isinstance(p, bool) and str(p).strip() not in ("", "0"):
            out.append(str(p).strip())
        elif p not in (0, "0", "", None):
            notes.append(f"{qid}: unreadable parent {str(p)[:40]!r}; dropped")
    return out


def _question(i: int, item: Any, taken: set[str], notes: list[str]) -> Question | None:
    if isinstance(item, str):
        item = {"question": item}
        notes.append(f"item {i}: a bare string; made it a question")
    if not isinstance(item, dict):
        notes.append(f"item {i}: {type(item).__name__} is not an object; dropped")
        return None
    text = next((item[k] for k in ("question", "text", "q", "content") if isinstance(item.get(k), str)), "")
    if not text.strip():
        notes.append(f"item {i}: no question text; dropped")
        return None
    raw_id = item.get("id")
    qid = str(raw_id).strip() if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else ""
    if not qid or qid in taken:
        new = next(f"q{n}" for n in range(i + 1, i + len(taken) + 3) if f"q{n}" not in taken)
        notes.append(f"item {i}: id {str(raw_id)[:20]!r} missing or duplicate; renamed {new!r}")
        qid = new
    taken.add(qid)
    kind, cat = _kind_and_category(item, qid, notes)
    raw_parents = next((item[k] for k in ("parents", "parent", "depends_on", "dependencies") if k in item), None)
    return Question(id=qid, text=text.strip(), kind=kind, category=cat, parents=tuple(_parent_ids(raw_parents, qid, notes)))


def _repair_graph(questions: list[Question], notes: list[str]) -> list[Question]:
    """Drop dangling/self/duplicate parents, then every edge that would close a cycle (in list order)."""
    ids = {q.id for q in questions}
    kept: dict[str, list[str]] = {}

    def reaches(a: str, b: str) -> bool:         # can a reach b through kept parent edges?
        stack, seen = [a], set()
        while stack:
            n = stack.pop()
            if n == b:
                return True
            if n not in seen:
                seen.add(n)
                stack.extend(kept.get(n, ()))
        return False

    out = []
    for q in questions:
        kept[q.id] = []
        for p in dict.fromkeys(q.parents):
            if p == q.id or p not in ids:
                notes.append(f"{q.id}: {'self' if p == q.id else 'dangling'} parent {p[:20]!r}; dropped")
            elif reaches(p, q.id):
                notes.append(f"{q.id}: parent {p!r} would close a cycle; dropped")
            else:
                kept[q.id].append(p)
        out.append(Question(id=q.id, text=q.text, kind=q.kind, category=q.category, parents=tuple(kept[q.id])))
    return out


def parse_decomposition(text: Any, *, prompt: str, version: DecomposerVersion, context: str = "") -> QuestionSet:
    """A valid QuestionSet from an LLM reply, repaired where possible; DecompositionError otherwise."""
    if not isinstance(text, str):
        raise DecompositionError(prompt, f"the reply is {type(text).__name__}, not text")
    notes: list[str] = []
    try:
        value, load_notes = load_lenient(text)
        notes += load_notes
        taken: set[str] = set()
        questions = [q for i, item in enumerate(_items(value, notes)) if (q := _question(i, item, taken, notes))]
    except (ValueError, RecursionError) as e:
        raise DecompositionError(prompt, f"{e} (reply starts {text[:80]!r})") from None
    if not questions:
        raise DecompositionError(prompt, f"no usable questions (reply starts {text[:80]!r}; notes: {notes[:5]})")
    if len(questions) > MAX_QUESTIONS:
        raise DecompositionError(prompt, f"{len(questions)} questions (limit {MAX_QUESTIONS}): a runaway reply")
    try:
        return QuestionSet(prompt=prompt, prompt_hash=prompt_key(prompt, context=context), version=version,
                           questions=tuple(_repair_graph(questions, notes)), notes=tuple(notes))
    except QuestionSetError as e:      # unreachable if the repairs are complete; still never escapes
        raise DecompositionError(prompt, str(e)) from None


def decompose_with_retries(generate_fn: Callable[[str], str], prompt: str, *, budget: int,
                           version: DecomposerVersion, context: str = "") -> QuestionSet:
    """Ask `generate_fn(request)` until its reply parses, at most `budget` times.

    A retry request tells the model what was wrong. After `budget` failures a DecompositionError
    names the prompt and every attempt's reason. Errors raised by `generate_fn` itself (network,
    engine) propagate unchanged: the budget is for malformed replies, not for outages.
    """
    if budget < 1:
        raise ValueError(f"decompose_with_retries: budget={budget!r} must be >= 1")
    reasons, previous = [], None
    for _ in range(budget):
        reply = generate_fn(decomposition_request(prompt, previous_error=previous))
        try:
            return parse_decomposition(reply, prompt=prompt, version=version, context=context)
        except DecompositionError as e:
            reasons.append(e.reason)
            previous = e.reason
    listed = "; ".join(f"attempt {i + 1}: {r}" for i, r in enumerate(reasons))
    raise DecompositionError(prompt, f"no usable reply in {budget} attempts ({listed})")
