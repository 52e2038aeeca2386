"""What the trainer reports of DVReward's audit records: how often each kind of question passes.

    pass rate of category c = share of the questions of category c (over every image given) whose
                              effective score (after the parent rule) exceeds `threshold`

Semantic categories (existence, count, attribute, spatial, ...) and quality aspects (geometry,
texture, ...) are both categories here, keyed by their lower-cased name; "all" pools every question.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from reward_service.aggregate import RewardResult


def question_pass_rates(audits: Iterable[RewardResult], *, threshold: float = 0.5) -> dict[str, float]:
    """{category: pass rate} over every question of every audit, plus "all"; {} for no questions."""
    passed: dict[str, list[bool]] = defaultdict(list)
    for audit in audits:
        for row in audit.rows:
            ok = row.effective > threshold
            passed[row.category.lower()].append(ok)
            passed["all"].append(ok)
    return {c: sum(v) / len(v) for c, v in sorted(passed.items())}
