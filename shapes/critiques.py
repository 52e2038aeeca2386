"""What an SRR critique is, read over the world's closed vocabulary (analysis only: never a reward).

    critique_kind("assistant <think> the circle is red </think> make the circle blue") -> "instruction"
    critique_kind("assistant a red square and a red circle")                          -> "description"
    critique_kind("assistant yes")                                                     -> "answer"

The method's reflection writes a critique and an edit instruction; a model that was never taught to
reflect writes what its pretraining taught it to say after an image: a caption (a description) or a
VQA answer. The share of each kind tells whether SRR has an instruction to reinforce at all (issue 17).
"""
from __future__ import annotations

import re

from shapes.edits import TEMPLATES
from shapes.plans import parse_plan
# the words an edit instruction starts with: the first word of every edit template ("make", "add", ...)
EDIT_VERBS: frozenset[str] = frozenset(t.split()[0] for templates in TEMPLATES.values() for t in templates)
ROLE_WORDS = ("assistant", "user", "system")


def critique_kind(text: str) -> str:
    """"instruction" when a clause (the text, or a part of it between think markers) starts with an edit
    verb; else "answer" for a bare yes / no; "description" when it names a shape; "other" otherwise.
    Role words are ignored. One of worlds.base.CRITIQUE_KINDS."""
    tokens = [t for t in re.findall(r"</?think>|[a-z]+", text.lower()) if t not in ROLE_WORDS]
    clauses, clause = [], []
    for t in tokens + ["<think>"]:
        if t in ("<think>", "</think>"):
            if clause:
                clauses.append(clause)
            clause = []
        else:
            clause.append(t)
    if any(c[0] in EDIT_VERBS for c in clauses):
        return "instruction"
    if clauses in ([["yes"]], [["no"]]):
        return "answer"
    if parse_plan(text).objects:
        return "description"
    return "other"
