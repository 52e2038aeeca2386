"""DVReward(shapes) on rendered images: correct renders outrank corrupted renders of the same prompt,
and the strict pass (every semantic score > 0.5) agrees with the programmatic judge.

Pairs: a prompt, a correct scene for it (layout.sample_scene), and the same scene corrupted by one
applicable negative kind (shapes.negatives, kinds tried in random order). The verifier runs once per
image; every aggregation mode and parent rule is checked on the same scores.
"""
import random
from collections import Counter

import pytest

from reward_service.aggregate import MODES, PARENT_RULES, aggregate
from reward_service.backends.shapes_decomposer import decompose
from reward_service.backends.shapes_verifier import answer_set
from shapes.judge import judge
from shapes.layout import sample_scene
from shapes.negatives import NEGATIVE_KINDS, corrupt
from shapes.prompts import GENEVAL_FAMILIES, generate
from shapes.scene import render

CANVAS = 32


def _pairs(families, n_pairs, seed):
    """(question set, meaning, [(image, scores, kind)] for the correct and the corrupted render)."""
    rng = random.Random(seed)
    out = []
    while len(out) < n_pairs:
        prompt = generate(families[len(out) % len(families)], rng, canvas_size=CANVAS)
        scene = sample_scene(prompt.meaning, rng, canvas_size=CANVAS)
        kinds = list(NEGATIVE_KINDS)
        rng.shuffle(kinds)
        found = next(((k, b) for k in kinds if (b := corrupt(scene, prompt.meaning, k, rng)) is not None), None)
        if found is None:
            continue
        qs = decompose(prompt.text, meaning=prompt.meaning)
        images = [(render(scene), "correct"), (render(found[1]), found[0])]
        out.append((qs, prompt.meaning, [(im, answer_set(im, qs), kind) for im, kind in images]))
    return out


def _check(pairs, *, min_rank, min_agree):
    counts = Counter()
    for qs, meaning, ((good, s_good, _), (bad, s_bad, kind)) in pairs:
        for mode in MODES:
            for rule in PARENT_RULES:
                r_good = aggregate(qs, s_good, mode=mode, parent_rule=rule)
                r_bad = aggregate(qs, s_bad, mode=mode, parent_rule=rule)
                counts[(mode, rule)] += r_good.reward > r_bad.reward
        for image, scores in ((good, s_good), (bad, s_bad)):
            counts["agree"] += aggregate(qs, scores).strict_pass() == judge(image, meaning).correct
        counts[kind] += 1
    n = len(pairs)
    for mode in MODES:
        for rule in PARENT_RULES:
            assert counts[(mode, rule)] / n >= min_rank, (mode, rule, counts[(mode, rule)], n)
    assert counts["agree"] / (2 * n) >= min_agree, (counts["agree"], 2 * n)
    return counts


def test_ranks_correct_above_corrupted_on_500_geneval_pairs():
    pairs = _pairs(GENEVAL_FAMILIES, 500, seed=0)
    counts = _check(pairs, min_rank=0.95, min_agree=0.95)
    assert {k for k in NEGATIVE_KINDS if counts[k] > 0} == set(NEGATIVE_KINDS)   # every corruption kind used


@pytest.mark.parametrize("family", ["implicit_color", "implicit_count", "edit"])
def test_ranks_and_agrees_on_implicit_and_edit_prompts(family):
    _check(_pairs((family,), 40, seed=1), min_rank=0.95, min_agree=0.95)
