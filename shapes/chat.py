"""The fixed instruction texts of the shapes world's chat format.

Every turn is `<|im_start|> role words <|im_end|>` (shapes.tokenizer.encode_turn); these are the
words the system and the user say around the world's prompts. The tokenizer's corpus includes them.
"""
from __future__ import annotations

SYSTEM_THINK = "think, then draw."
SYSTEM_REFLECT = "your image is wrong. say what is wrong and how to fix it."
CAPTION_QUESTION = "describe the image."
ANSWER_STYLE = "answer yes or no."

TEXTS: tuple[str, ...] = (SYSTEM_THINK, SYSTEM_REFLECT, CAPTION_QUESTION, ANSWER_STYLE)


def think_text(explicit: str) -> str:
    """The plan written before drawing: `<think> a green circle </think>`."""
    return f"<think> {explicit} </think>"
