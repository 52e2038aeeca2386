"""Question sets: valid by construction, clear errors, JSON round trip, parents before children."""
import pytest

from reward_service.schema import DecomposerVersion, Question, QuestionSet, QuestionSetError, prompt_key

V = DecomposerVersion(name="test", template_version="t1")


def q(qid, *, kind="semantic", category="existence", parents=(), atom=None):
    return Question(id=qid, text=f"question {qid}?", kind=kind, category=category, parents=parents, atom=atom)


def make(*questions, prompt="a red circle"):
    return QuestionSet(prompt=prompt, prompt_hash=prompt_key(prompt), version=V, questions=questions)


def test_valid_set_round_trips_through_json():
    qs = make(q("e0", atom={"kind": "exists", "shape": "circle"}), q("a0", category="attribute", parents=("e0",)),
              q("qg", kind="quality", category="geometry"))
    back = QuestionSet.from_json(qs.to_json())
    assert back == qs
    assert [x.id for x in back.semantic] == ["e0", "a0"] and [x.id for x in back.quality] == ["qg"]
    assert back.questions[0].atom == {"kind": "exists", "shape": "circle"}
    assert hash(back.questions[0]) == hash(qs.questions[0])      # atoms do not stop questions being hashable


@pytest.mark.parametrize("questions, match", [
    ((), "no questions"),
    ((q("a"), q("a")), "duplicate question id 'a'"),
    ((q("a", category="colourfulness"),), "unknown semantic category 'colourfulness'"),
    ((q("a", kind="quality", category="existence"),), "unknown quality category 'existence'"),
    ((q("a", kind="aesthetic"),), "kind='aesthetic'"),
    ((q("a", parents=("zz",)),), "dangling parent id 'zz'"),
    ((q("a", parents=("a",)),), "its own parent"),
    ((q("a", parents=("c",)), q("b", parents=("a",)), q("c", parents=("b",))), "parent cycle a -> c -> b -> a"),
    ((q(""),), "non-empty string"),
    ((Question(id="a", text="  ", kind="semantic", category="count"),), "has no text"),
    ((q("a", atom=["not", "a", "dict"]),), "atom must be a dict"),
])
def test_invalid_sets_fail_naming_prompt_and_problem(questions, match):
    with pytest.raises(QuestionSetError, match=match) as e:
        make(*questions, prompt="two blue squares")
    assert "'two blue squares'" in str(e.value)


def test_topological_order_puts_parents_first():
    qs = make(q("child", parents=("mid",)), q("mid", parents=("root",)), q("root"), q("other"))
    order = [qs.questions[i].id for i in qs.topological_order()]
    assert sorted(order) == sorted(x.id for x in qs.questions)
    assert order.index("root") < order.index("mid") < order.index("child")


def test_versions_and_keys():
    assert str(V) == "test@t1" and DecomposerVersion.parse("test@t1") == V
    with pytest.raises(ValueError, match="template_version"):
        DecomposerVersion(name="x", template_version="")
    with pytest.raises(ValueError, match="name@template_version"):
        DecomposerVersion.parse("no-at-sign")
    assert prompt_key("a circle") != prompt_key("a circle", context='{"objects":[]}')
    assert prompt_key("a circle") == prompt_key("a circle")


@pytest.mark.parametrize("text", ["", "[]", "{}", '{"schema": 1}', '{"schema": 99, "prompt": "x"}',
                                  '{"schema": 1, "prompt": "x", "prompt_hash": "h", "version": "a@b", '
                                  '"questions": [], "notes": []}'])
def test_from_json_rejects_broken_payloads(text):
    with pytest.raises(QuestionSetError):
        QuestionSet.from_json(text)
