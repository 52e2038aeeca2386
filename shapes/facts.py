"""A fixed table of world knowledge for implicit-intent prompts and text-only QA.

Colour facts name a thing whose colour everybody knows ("the colour of grass" -> green); count facts
name a thing with a known number of parts ("as many squares as a triangle has corners" -> 3). Every
fact also has a question/answer form for text-only pretraining. All facts are known as text; what
a split holds out is prompts, so nothing here is split.
"""
from __future__ import annotations

from dataclasses import dataclass

from shapes.world import COLOURS, MAX_COUNT, number_word


@dataclass(frozen=True, kw_only=True)
class Fact:
    """One fact: `phrase` slots into a prompt template; `value` is what it resolves to."""
    kind: str                       # "colour" or "count"
    phrase: str                     # colour: "grass" (after "the colour of"); count: "a triangle has corners"
    value: str | int                # colour name, or count 1..MAX_COUNT
    question: str                   # "what colour is grass?"
    answer: str                     # "green" / "three"

    @property
    def names_answer(self) -> bool:
        """The phrase itself contains the answer word ("the colour of an orange"): fine as text QA,
        no test of inference as an implicit prompt."""
        return self.answer in self.phrase.split()


def _colour(phrase: str, value: str, question: str) -> Fact:
    return Fact(kind="colour", phrase=phrase, value=value, question=question, answer=value)


def _count(phrase: str, value: int, question: str) -> Fact:
    return Fact(kind="count", phrase=phrase, value=value, question=question, answer=number_word(value))


COLOUR_FACTS: tuple[Fact, ...] = (
    _colour("grass", "green", "what colour is grass?"),
    _colour("a leaf", "green", "what colour is a leaf?"),
    _colour("a frog", "green", "what colour is a frog?"),
    _colour("a cucumber", "green", "what colour is a cucumber?"),
    _colour("the sky", "blue", "what colour is the sky?"),
    _colour("the sea", "blue", "what colour is the sea?"),
    _colour("a blueberry", "blue", "what colour is a blueberry?"),
    _colour("a sapphire", "blue", "what colour is a sapphire?"),
    _colour("a banana", "yellow", "what colour is a banana?"),
    _colour("a lemon", "yellow", "what colour is a lemon?"),
    _colour("a sunflower", "yellow", "what colour is a sunflower?"),
    _colour("an egg yolk", "yellow", "what colour is an egg yolk?"),
    _colour("blood", "red", "what colour is blood?"),
    _colour("a strawberry", "red", "what colour is a strawberry?"),
    _colour("a ripe tomato", "red", "what colour is a ripe tomato?"),
    _colour("a fire truck", "red", "what colour is a fire truck?"),
    _colour("an orange", "orange", "what colour is an orange?"),
    _colour("a carrot", "orange", "what colour is a carrot?"),
    _colour("a pumpkin", "orange", "what colour is a pumpkin?"),
    _colour("a tangerine", "orange", "what colour is a tangerine?"),
    _colour("a plum", "purple", "what colour is a plum?"),
    _colour("grapes", "purple", "what colour are grapes?"),
    _colour("an aubergine", "purple", "what colour is an aubergine?"),
    _colour("lavender", "purple", "what colour is lavender?"),
)

COUNT_FACTS: tuple[Fact, ...] = (
    _count("a unicycle has wheels", 1, "how many wheels does a unicycle have?"),
    _count("a unicorn has horns", 1, "how many horns does a unicorn have?"),
    _count("a person has noses", 1, "how many noses does a person have?"),
    _count("a bicycle has wheels", 2, "how many wheels does a bicycle have?"),
    _count("a bird has wings", 2, "how many wings does a bird have?"),
    _count("a person has eyes", 2, "how many eyes does a person have?"),
    _count("a triangle has corners", 3, "how many corners does a triangle have?"),
    _count("a tricycle has wheels", 3, "how many wheels does a tricycle have?"),
    _count("a traffic light has lights", 3, "how many lights does a traffic light have?"),
    _count("a square has sides", 4, "how many sides does a square have?"),
    _count("a car has wheels", 4, "how many wheels does a car have?"),
    _count("a dog has legs", 4, "how many legs does a dog have?"),
    _count("a year has seasons", 4, "how many seasons does a year have?"),
)

FACTS: tuple[Fact, ...] = COLOUR_FACTS + COUNT_FACTS

# What implicit-intent prompts (training and shapes-geneval) draw from: every fact except those that
# name their answer. All of FACTS stays in the text-only QA of pretraining.
IMPLICIT_COLOUR_FACTS: tuple[Fact, ...] = tuple(f for f in COLOUR_FACTS if not f.names_answer)
IMPLICIT_COUNT_FACTS: tuple[Fact, ...] = tuple(f for f in COUNT_FACTS if not f.names_answer)


def _check_table() -> None:
    for f in COLOUR_FACTS:
        if f.value not in COLOURS:
            raise ValueError(f"colour fact {f.phrase!r}: value {f.value!r} is not a world colour")
    for f in COUNT_FACTS:
        if not (isinstance(f.value, int) and 1 <= f.value <= MAX_COUNT):
            raise ValueError(f"count fact {f.phrase!r}: value {f.value!r} is not in 1..{MAX_COUNT}")
    phrases = [f.phrase for f in FACTS]
    if len(set(phrases)) != len(phrases):
        raise ValueError("facts table: duplicate phrases")
    for kind, usable, values in (("colour", IMPLICIT_COLOUR_FACTS, COLOURS),
                                 ("count", IMPLICIT_COUNT_FACTS, range(1, MAX_COUNT + 1))):
        missing = [v for v in values if not any(f.value == v for f in usable)]
        if missing:
            raise ValueError(f"facts table: no implicit-prompt {kind} fact resolves to {missing}")


_check_table()


def colour_facts(colour: str) -> tuple[Fact, ...]:
    """Facts that resolve to `colour` (a ValueError names an unknown colour)."""
    if colour not in COLOURS:
        raise ValueError(f"colour={colour!r}: not one of {tuple(COLOURS)}")
    return tuple(f for f in COLOUR_FACTS if f.value == colour)


def count_facts(n: int) -> tuple[Fact, ...]:
    """Facts that resolve to the count `n`."""
    return tuple(f for f in COUNT_FACTS if f.value == n)
