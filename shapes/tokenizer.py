"""A word-level tokenizer over the shapes world's closed vocabulary, built offline.

Ids are fixed: the eight specials first, in the order of the tiny model preset's SpecialTokens
(pad=0, bos/<|im_start|>=1, eos/<|im_end|>=2, start_of_image/<|vision_start|>=3,
end_of_image/<|vision_end|>=4), then <think>=5, </think>=6, <unk>=7; the role words system=8,
user=9, assistant=10; punctuation; digits; then every word the generators can produce, sorted;
then `extra_words` in the order given (so extras never move the ids before them).
Text is lower-cased and split on whitespace and punctuation, digits one by one. `decode` rebuilds
the normalised text exactly: `decode(tok, encode(tok, t)) == normalise(t)`.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

from shapes import chat, edits, facts, prompts
from shapes.questions import AtomicQuestion
from shapes.world import COLOUR_NAMES, NUMBER_WORDS, RELATIONS, SHAPES, plural

SPECIALS: tuple[str, ...] = ("<pad>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                             "<think>", "</think>", "<unk>")
SPECIAL_IDS: dict[str, int] = {s: i for i, s in enumerate(SPECIALS)}
PAD_ID, IM_START_ID, IM_END_ID, VISION_START_ID, VISION_END_ID, THINK_ID, END_THINK_ID, UNK_ID = range(8)
ROLES: tuple[str, ...] = ("system", "user", "assistant")
PUNCTUATION: tuple[str, ...] = (".", ",", "?", "!", ":", ";")
DIGITS: tuple[str, ...] = tuple("0123456789")
ANSWER_WORDS: tuple[str, ...] = ("yes", "no")


def normalise(text: str) -> str:
    """Lower-case, single spaces, no space before punctuation: the form `decode` reproduces."""
    text = " ".join(text.lower().split())
    return re.sub(r" ([.,?!:;])", r"\1", text)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])


def _words(text: str) -> list[str]:
    return [w for w, _ in _pre_tokenizer().pre_tokenize_str(normalise(text))]


def _question_texts() -> list[str]:
    colours = (None, *COLOUR_NAMES)
    out = [AtomicQuestion(kind="exists", shape=s, colour=c).text for s in SHAPES for c in colours]
    out += [AtomicQuestion(kind="count", shape=s, colour=c, n=n).text
            for s in SHAPES for c in colours for n in range(6)]
    out += [AtomicQuestion(kind="colour_of", shape=s, colour=c).text for s in SHAPES for c in COLOUR_NAMES]
    out += [AtomicQuestion(kind="relation", shape=a, relation=r, other_shape=b).text
            for a, b in itertools.permutations(SHAPES, 2) for r in RELATIONS]
    return out


def corpus_texts() -> list[str]:
    """Texts whose words together cover everything the world's generators can say."""
    templates = [t for ts in itertools.chain(prompts.TEMPLATES.values(), edits.TEMPLATES.values()) for t in ts]
    texts = [re.sub(r"\{[a-z0-9_]+\}", " ", t) for t in templates]
    texts += [" ".join(SHAPES), " ".join(plural(s) for s in SHAPES), " ".join(COLOUR_NAMES),
              " ".join(NUMBER_WORDS.values()), "a an the and with", " ".join(ANSWER_WORDS)]
    texts += [f.phrase for f in facts.FACTS] + [f.question for f in facts.FACTS] + [f.answer for f in facts.FACTS]
    texts += _question_texts() + list(chat.TEXTS)
    return texts


def vocabulary(extra_words: tuple[str, ...] = ()) -> list[str]:
    """The ordered vocabulary (index = id)."""
    fixed = list(SPECIALS) + list(ROLES) + list(PUNCTUATION) + list(DIGITS)
    words = sorted({w for t in corpus_texts() for w in _words(t)} - set(fixed))
    vocab = fixed + words
    for w in extra_words:
        if _words(w) != [w]:
            raise ValueError(f"extra_words: {w!r} is not a single normalised word")
        if w not in vocab:
            vocab.append(w)
    return vocab


def build_tokenizer(*, extra_words: tuple[str, ...] = ()) -> Tokenizer:
    """The world's tokenizer; deterministic: same code and extra_words -> same ids."""
    vocab = vocabulary(extra_words)
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = _pre_tokenizer()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    check_special_ids(tok)
    return tok


def check_special_ids(tok: Tokenizer) -> None:
    """Raise a ValueError naming any special token whose id is not the fixed one."""
    for s, i in SPECIAL_IDS.items():
        if tok.token_to_id(s) != i:
            raise ValueError(f"tokenizer: special {s!r} has id {tok.token_to_id(s)}, expected {i}")


def save(tok: Tokenizer, path: str | Path) -> None:
    tok.save(str(path))


def load(path: str | Path) -> Tokenizer:
    """Load a saved tokenizer and check its special ids."""
    tok = Tokenizer.from_file(str(path))
    check_special_ids(tok)
    return tok


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Ids of `text` (no specials added; unknown words -> <unk>)."""
    return tok.encode(text, add_special_tokens=False).ids


def decode(tok: Tokenizer, ids: list[int], *, skip_special: bool = True) -> str:
    """Text of `ids`: words joined by spaces, none before punctuation or between digits."""
    out: list[str] = []
    for i in ids:
        t = tok.id_to_token(i)
        if t is None:
            raise ValueError(f"decode: id {i} is not in the vocabulary (size {tok.get_vocab_size()})")
        if skip_special and t in SPECIAL_IDS and t != "<unk>":
            continue
        glue = out and (t in PUNCTUATION or (t in DIGITS and out[-1][-1:] in DIGITS))
        out.append(t if not out or glue else " " + t)
    return "".join(out)


def turn_ids(tok: Tokenizer, role: str, text: str) -> list[int]:
    """role text as ids, without the turn markers (the model adds <|im_start|>/<|im_end|> itself)."""
    if role not in ROLES:
        raise ValueError(f"encode_turn: role={role!r} is not one of {ROLES}")
    return [tok.token_to_id(role)] + encode(tok, text)


def encode_turn(tok: Tokenizer, role: str, text: str) -> list[int]:
    """<|im_start|> role text <|im_end|> as ids (role: system, user or assistant)."""
    return [IM_START_ID, *turn_ids(tok, role, text), IM_END_ID]


class ShapesTokenizer:
    """The world's tokenizer behind the trainer's tokenizer interface (umm.tokenizer.TextTokenizer);
    registered as the `shapes` kind of the `alphagrpo.tokenizers` entry-point group, so a checkpoint
    whose prompt_format.json says `"tokenizer": "shapes"` loads with it."""

    def __init__(self, tok: Tokenizer, *, source: str = "shapes.tokenizer") -> None:
        check_special_ids(tok)
        self.tok, self.source = tok, source

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> "ShapesTokenizer":
        path = Path(directory) / "tokenizer.json"
        if not path.exists():
            raise ValueError(f"{path}: not found (a shapes checkpoint carries its tokenizer.json)")
        return cls(load(path), source=str(path))

    def encode(self, text: str) -> list[int]:
        return encode(self.tok, text)

    def decode(self, ids) -> str:
        """Ids past the vocabulary (the model's is padded) read as <unk>."""
        return decode(self.tok, [i if self.tok.id_to_token(int(i)) is not None else UNK_ID for i in map(int, ids)])

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def pad_token(self) -> str:
        return SPECIALS[PAD_ID]

    def __len__(self) -> int:
        return self.tok.get_vocab_size()
