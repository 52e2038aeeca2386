"""BAGEL's prompt layout, in one place: text -> the model contexts the policy draws and writes from.

    every text segment     [<|im_start|>] + tokenizer.encode(text) + [<|im_end|>]   (umm.context.Text
                           adds the two markers; no ChatML role lines, as BAGEL's inference code)
    think-then-draw        [system: THINK_SYSTEM] [user: prompt] -> the plan is written, then drawn
    edit                   [source image] [user: instruction]
    reflect (SRR)          [system: REFLECT_SYSTEM] [source image] [user: prompt] -> critique + instruction

A checkpoint may carry `prompt_format.json` overriding the defaults below: which tokenizer it uses,
whether a turn opens with its role word (the shapes world's closed-vocabulary chat format does) and
the two system prompts (a small vocabulary cannot say the default wording). BAGEL-7B-MoT's folder
has none, so it gets exactly the layout above.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from umm.context import DrawPrompt, Image, Text
from umm.errors import CheckpointError
from umm.tokenizer import FORMAT_FILE, TextTokenizer, load_tokenizer

# our own wording (method-facts.md: the method asks for a plan in <think> </think>, then the image)
THINK_SYSTEM = ("Before drawing, plan the image inside <think> </think>: work out what the request implies "
                "(which objects, how many, their colours, sizes, positions and any text), then draw exactly "
                "what the plan describes.")
REFLECT_SYSTEM = ("The image below was drawn for the request that follows, and it is wrong. Inside <think> "
                  "</think>, say what in the image does not match the request; then write one edit "
                  "instruction that fixes it.")
ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True, kw_only=True)
class PromptFormat:
    """How a checkpoint's text is laid out (defaults: BAGEL's). Stored as prompt_format.json."""
    tokenizer: str = "transformers"     # umm.tokenizer.load_tokenizer's kind
    role_words: bool = False            # a turn opens with its role word's token (not BAGEL's layout)
    think_system: str = THINK_SYSTEM    # the think-then-draw system prompt
    reflect_system: str = REFLECT_SYSTEM  # SRR: the model is told its image is wrong

    @classmethod
    def load(cls, directory: str | Path) -> "PromptFormat":
        """The folder's prompt_format.json over the defaults (the defaults when there is none)."""
        path = Path(directory) / FORMAT_FILE
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FORMAT_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)
        return path


def image_item(image: np.ndarray) -> Image:
    """A uint8 (H, W, 3) image as a context item (pixels in [-1, 1])."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must be a uint8 (H, W, 3) array, got {arr.dtype} {arr.shape}")
    return Image(pixels=(torch.from_numpy(arr.astype(np.float32)) / 127.5 - 1.0).permute(2, 0, 1).contiguous())


class Prompter:
    """Builds contexts from text with a checkpoint's tokenizer and prompt format."""

    def __init__(self, tok: TextTokenizer, fmt: PromptFormat | None = None) -> None:
        self.tok, self.fmt = tok, fmt or PromptFormat()
        if self.fmt.role_words:
            missing = [r for r in ROLES if tok.token_id(r) is None]
            if missing:
                raise CheckpointError(f"{tok.source}: prompt format has role_words but the tokenizer lacks {missing}")

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> "Prompter":
        return cls(load_tokenizer(directory), PromptFormat.load(directory))

    def turn(self, role: str, text: str) -> Text:
        """One text segment: the text's ids (after the role word's id with `role_words`)."""
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {ROLES}")
        ids = self.tok.encode(text)
        return Text(ids=tuple(([self.tok.token_id(role)] if self.fmt.role_words else []) + ids))

    def draw(self, text: str, *, think: bool) -> DrawPrompt:
        """Text-to-image from `text`; with `think` the think-then-draw system prompt comes first (and is
        the whole of text-CFG's unconditional context)."""
        prefix = [self.turn("system", self.fmt.think_system)] if think else []
        return DrawPrompt(prefix=prefix, text=self.turn("user", text))

    def edit(self, source: np.ndarray, instruction: str) -> DrawPrompt:
        """Redraw `source` (uint8 (H, W, 3)) following `instruction`."""
        return DrawPrompt(prefix=[image_item(source)], text=self.turn("user", instruction))

    def reflect(self, source: np.ndarray, text: str) -> DrawPrompt:
        """SRR's reflection context: told its image of `text` is wrong, the model writes a critique and
        an edit instruction (the DrawPrompt's text is the request; the reply is written after it)."""
        return DrawPrompt(prefix=[self.turn("system", self.fmt.reflect_system), image_item(source)],
                          text=self.turn("user", text))

    def plan_text(self, ids) -> str:
        """A written plan (token ids, closing <|im_end|> and padding included or not) as text."""
        return self.tok.decode([int(i) for i in ids])

    def length(self, prompt: DrawPrompt) -> int:
        """Text tokens of the prompt's context, markers included (images not counted)."""
        return sum(len(item.ids) + 2 for item in prompt.full() if isinstance(item, Text))
