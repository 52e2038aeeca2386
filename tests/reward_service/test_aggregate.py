"""Aggregation modes, parent rules, the audit record, and yes/no probabilities from log-probs."""
import json
import math

import pytest

from reward_service.aggregate import SCORE_TOLERANCE, aggregate, combine_semantic, yes_from_text, yes_probability
from reward_service.schema import DecomposerVersion, Question, QuestionSet, prompt_key

V = DecomposerVersion(name="test", template_version="t1")


def qset(*spec):
    """spec: (id, kind, parents) triples."""
    cats = {"semantic": "existence", "quality": "geometry"}
    return QuestionSet(prompt="p", prompt_hash=prompt_key("p"), version=V,
                       questions=tuple(Question(id=i, text=f"{i}?", kind=k, category=cats[k], parents=ps)
                                       for i, k, ps in spec))


DSG = qset(("e", "semantic", ()), ("a", "semantic", ("e",)), ("g", "semantic", ("a",)),
           ("q1", "quality", ()), ("q2", "quality", ()))
SEMANTIC_QS = qset(("e", "semantic", ()), ("r", "semantic", ()), ("q", "quality", ()))


def test_modes():
    scores = [0.9, 0.5, 0.7, 1.0, 0.6]
    sem, qual = (0.9 + 0.5 + 0.7) / 3, 0.8
    assert aggregate(DSG, scores).reward == pytest.approx(math.sqrt(sem * qual))
    assert aggregate(DSG, scores, mode="mean").reward == pytest.approx((sem + qual) / 2)
    r = aggregate(DSG, scores, mode="min")
    assert r.reward == pytest.approx(sem) and r.semantic_mean == pytest.approx(0.7) and r.quality_mean == 0.8
    assert aggregate(DSG, [1, 1, 1, 0.5, 0.3], mode="min").reward == pytest.approx(0.4)


def test_empty_halves_count_as_one():
    only_sem = qset(("e", "semantic", ()))
    assert aggregate(only_sem, [0.25]).reward == pytest.approx(0.5) and aggregate(only_sem, [0.25]).quality_mean == 1.0
    only_qual = qset(("q", "quality", ()))
    r = aggregate(only_qual, [0.36])
    assert r.semantic_mean == 1.0 and r.reward == pytest.approx(0.6) and r.strict_pass()


def test_parent_rules_propagate_through_grandparents():
    scores = [0.3, 0.9, 0.8, 1.0, 1.0]                 # e fails; its child a and grandchild g pass
    none = aggregate(DSG, scores)
    assert [r.effective for r in none.rows[:3]] == [0.3, 0.9, 0.8]
    zero = aggregate(DSG, scores, parent_rule="zero")
    assert [r.effective for r in zero.rows[:3]] == [0.3, 0.0, 0.0]
    assert [r.score for r in zero.rows[:3]] == [0.3, 0.9, 0.8]          # raw scores stay in the audit
    scale = aggregate(DSG, scores, parent_rule="scale")
    assert [r.effective for r in scale.rows[:3]] == pytest.approx([0.3, 0.27, 0.8 * 0.27])
    ok = aggregate(DSG, [0.9, 0.8, 0.7, 1, 1], parent_rule="zero")
    assert [r.effective for r in ok.rows[:3]] == [0.9, 0.8, 0.7]        # passing parents change nothing
    assert none.reward > scale.reward > zero.reward


def test_zero_rule_fails_a_parent_exactly_at_fail_below():
    """"zero" zeroes a child when a parent's effective score is <= fail_below (at the threshold counts)."""
    at = aggregate(DSG, [0.5, 0.9, 0.8, 1, 1], parent_rule="zero")
    assert [r.effective for r in at.rows[:3]] == [0.5, 0.0, 0.0]
    below = aggregate(DSG, [0.5, 0.9, 0.8, 1, 1], parent_rule="zero", fail_below=0.4)
    assert [r.effective for r in below.rows[:3]] == [0.5, 0.9, 0.8]


def test_parents_listed_after_children_still_work():
    qs = qset(("child", "semantic", ("root",)), ("root", "semantic", ()))
    assert [r.effective for r in aggregate(qs, [0.9, 0.1], parent_rule="zero").rows] == [0.0, 0.1]


def test_audit_record_and_strict_pass():
    r = aggregate(DSG, [0.9, 0.6, 0.51, 0.2, 0.1])
    assert r.strict_pass() and not r.strict_pass(threshold=0.55)     # quality does not enter strict pass
    assert [row.id for row in r.rows] == ["e", "a", "g", "q1", "q2"] and r.rows[2].parents == ("a",)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["rows"][1]["parents"] == ["e"] and d["version"] == "test@t1" and d["prompt_hash"] == DSG.prompt_hash
    assert "semantic_mean=0.6700" in r.table()


def test_strict_pass_needs_every_semantic_score_above_the_threshold():
    """A semantic effective score equal to the threshold (0.5 by default) does not pass."""
    r = aggregate(DSG, [0.9, 0.5, 0.9, 1, 1])
    assert not r.strict_pass() and r.strict_pass(threshold=0.49)


# every number below is exact in binary, so the expected values are written out
AUDIT_QS = qset(("e", "semantic", ()), ("a", "semantic", ("e",)), ("r", "semantic", ("e", "a")),
                ("q", "quality", ()))
AUDIT_SCORES = [0.75, 0.5, 1.0, 1.0]  # scale rule: e 0.75, a 0.5 * 0.75, r 1 * min(0.75, 0.375)


def test_to_dict_is_plain_json_of_the_whole_record():
    r = aggregate(AUDIT_QS, AUDIT_SCORES, mode="min", parent_rule="scale")

    def row(i, kind, category, parents, score, effective):
        return {"id": i, "text": f"{i}?", "kind": kind, "category": category, "parents": parents,
                "score": score, "effective": effective}

    assert r.to_dict() == {
        "reward": 0.5, "semantic_mean": 0.5, "quality_mean": 1.0, "mode": "min", "parent_rule": "scale",
        "semantic_rule": "mean",
        "prompt": "p", "prompt_hash": prompt_key("p"), "version": "test@t1",
        "rows": [row("e", "semantic", "existence", [], 0.75, 0.75),
                 row("a", "semantic", "existence", ["e"], 0.5, 0.375),
                 row("r", "semantic", "existence", ["e", "a"], 1.0, 0.375),
                 row("q", "quality", "geometry", [], 1.0, 1.0)],
    }
    assert json.loads(json.dumps(r.to_dict())) == r.to_dict()


def test_table_layout():
    r = aggregate(AUDIT_QS, AUDIT_SCORES, mode="min", parent_rule="scale")
    assert r.table() == (
        "prompt: 'p'   (test@t1, mode=min, parent_rule=scale)\n"
        "id   kind     category   parents   score    eff  question\n"
        "e    semantic existence  -         0.750  0.750  e?\n"
        "a    semantic existence  e         0.500  0.375  a?\n"
        "r    semantic existence  e,a       1.000  0.375  r?\n"
        "q    quality  geometry   -         1.000  1.000  q?\n"
        "semantic_mean=0.5000 quality_mean=1.0000 reward=0.5000 strict_pass=False"
    )


def test_scores_within_tolerance_of_0_and_1_are_clamped():
    """A verifier's rounding may land a hair outside [0, 1]: up to SCORE_TOLERANCE is clamped, not refused."""
    r = aggregate(DSG, [-SCORE_TOLERANCE, 1 + SCORE_TOLERANCE, 0.0, 1.0, 0.5])
    assert [row.score for row in r.rows] == [0.0, 1.0, 0.0, 1.0, 0.5]
    for bad in (-2 * SCORE_TOLERANCE, 1 + 2 * SCORE_TOLERANCE):
        with pytest.raises(ValueError, match="question 'e'"):
            aggregate(DSG, [bad, 0.5, 0.5, 0.5, 0.5])


@pytest.mark.parametrize("scores, match", [
    ([0.5] * 4, "4 scores for 5 questions"),
    ([0.5, float("nan"), 0.5, 0.5, 0.5], "question 'a'"),
    ([0.5, 0.5, 1.5, 0.5, 0.5], "question 'g'"),
    ([0.5, 0.5, 0.5, -0.1, 0.5], "not in"),
])
def test_bad_scores_name_the_question(scores, match):
    with pytest.raises(ValueError, match=match):
        aggregate(DSG, scores)


def test_bad_options():
    with pytest.raises(ValueError, match="mode='max'"):
        aggregate(DSG, [1] * 5, mode="max")
    with pytest.raises(ValueError, match="parent_rule='all'"):
        aggregate(DSG, [1] * 5, parent_rule="all")


def test_yes_probability_sums_variants():
    lp = {"Yes": math.log(0.5), " yes": math.log(0.1), "YES.": math.log(0.05), "No": math.log(0.2),
          "\u2581no": math.log(0.05), "Maybe": math.log(0.1)}
    assert yes_probability(lp) == pytest.approx(0.65 / 0.9)
    assert yes_probability([("\u0120Yes", math.log(0.3)), ("\u0120Yes", math.log(0.3)), ("no!", math.log(0.4))]) \
        == pytest.approx(0.6)
    assert yes_probability({"Maybe": -0.1, "I": -2.0}) is None
    assert yes_probability({}) is None
    assert yes_probability({"yes": float("-inf"), "no": float("-inf")}) is None
    assert yes_probability({"no": -0.01}) == 0.0 and yes_probability({"yes": -3.0}) == 1.0
    assert yes_probability({"yesterday": -0.1, "note": -0.1, "no": -1.0}) == 0.0


def test_yes_probability_reads_positive_logprobs_as_probability_one():
    """Rounding can put a log-prob a little above 0; it counts as exp(0) = 1, never more."""
    assert yes_probability({"yes": 0.5, "no": math.log(0.5)}) == pytest.approx(1 / 1.5)


@pytest.mark.parametrize("text, expected", [
    ("Yes", 1.0), (" yes.", 1.0), ("No, there is no cat.", 0.0), ("YES!", 1.0), ("The answer is yes", 1.0),
    ("The answer is no", 0.0), ("", 0.0), ("maybe", 0.0), ("yes and no", 1.0), ("I'd say no, not yes", 0.0),
    ("yesterday", 0.0),
])
def test_yes_from_text(text, expected):
    assert yes_from_text(text) == expected


@pytest.mark.parametrize("rule", ["mean", "product", "softmin", "min"])
def test_semantic_rules_against_their_formulas(rule):
    """Each rule by hand on (0.9, 0.2, 0.8) with weights (existence 2, spatial 1, count 0: dropped)."""
    scores, cats = [0.9, 0.2, 0.8], ["existence", "spatial", "count"]
    weights = {"existence": 2.0, "count": 0.0}
    want = {"mean": (2 * 0.9 + 0.2) / 3, "product": 0.9 ** 2 * 0.2, "min": 0.2,
            "softmin": -0.1 * math.log((2 * math.exp(-9.0) + math.exp(-2.0)) / 3)}[rule]
    assert combine_semantic(scores, cats, rule=rule, temperature=0.1, weights=weights) == pytest.approx(want, rel=1e-12)
    assert combine_semantic([], [], rule=rule) == 1.0
    assert combine_semantic([0.3], ["count"], rule=rule, weights={"count": 0.0}) == 1.0   # nothing kept


def test_softmin_lies_between_min_and_mean_and_a_failed_clause_stays_visible():
    s, c = [1.0, 1.0, 1.0, 1.0, 1.0, 0.0], ["existence"] * 5 + ["spatial"]   # one clause of six fails
    mean = combine_semantic(s, c, rule="mean")
    assert mean == pytest.approx(5 / 6)
    for tau in (0.05, 0.2, 1.0):
        soft = combine_semantic(s, c, rule="softmin", temperature=tau)
        assert 0.0 <= soft <= mean
    assert combine_semantic(s, c, rule="softmin", temperature=0.05) < 0.1           # close to the min
    assert combine_semantic(s, c, rule="softmin", temperature=100.0) == pytest.approx(mean, abs=1e-3)
    r = aggregate(SEMANTIC_QS, [1.0, 0.0, 1.0], semantic="product")
    assert r.semantic_mean == 0.0 and r.reward == 0.0 and r.semantic_rule == "product"
    with pytest.raises(ValueError, match="semantic='median' is not one of"):
        aggregate(SEMANTIC_QS, [1.0, 0.0, 1.0], semantic="median")
    with pytest.raises(ValueError, match=r"category_weights must be >= 0, got \{'count': -1.0\}"):
        combine_semantic([0.5], ["count"], weights={"count": -1.0})
    with pytest.raises(ValueError, match="softmin temperature must be > 0"):
        combine_semantic([0.5], ["count"], rule="softmin", temperature=0.0)


def test_semantic_rules_without_weights_weigh_every_question_once_and_softmin_defaults_to_tau_0_1():
    s, c = [0.9, 0.5, 0.8], ["existence", "spatial", "count"]
    assert combine_semantic(s, c, rule="product") == pytest.approx(0.9 * 0.5 * 0.8, rel=1e-12)
    assert combine_semantic(s, c, rule="mean") == pytest.approx((0.9 + 0.5 + 0.8) / 3, rel=1e-12)
    want = 0.5 - 0.1 * math.log((math.exp(-4.0) + 1.0 + math.exp(-3.0)) / 3)   # docs/dvreward.md: tau 0.1
    assert combine_semantic(s, c, rule="softmin") == pytest.approx(want, rel=1e-12)


def test_aggregate_passes_its_semantic_temperature_and_category_weights_on():
    qs = QuestionSet(prompt="p", prompt_hash=prompt_key("p"), version=V, questions=(
        Question(id="e", text="e?", kind="semantic", category="existence", parents=()),
        Question(id="s", text="s?", kind="semantic", category="spatial", parents=()),
        Question(id="q", text="q?", kind="quality", category="geometry", parents=()),))
    scores = [0.9, 0.3, 1.0]
    soft = lambda tau, w: 0.3 - tau * math.log((w * math.exp(-0.6 / tau) + 1.0) / (w + 1.0))  # noqa: E731
    r = aggregate(qs, scores, semantic="softmin", temperature=0.5, category_weights={"existence": 3.0})
    assert r.semantic_mean == pytest.approx(soft(0.5, 3.0), rel=1e-12)
    assert aggregate(qs, scores, semantic="softmin").semantic_mean == pytest.approx(soft(0.1, 1.0), rel=1e-12)
    w = aggregate(qs, scores, semantic="mean", category_weights={"spatial": 0.0})
    assert w.semantic_mean == pytest.approx(0.9, rel=1e-12)
