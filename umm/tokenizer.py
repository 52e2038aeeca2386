"""A checkpoint's tokenizer behind one small interface, and the special ids the model needs from it.

    TextTokenizer   encode(text) -> ids, decode(ids) -> text, token_id(token) -> id | None, len()
    HFTokenizer     the Hugging Face tokenizer files of a BAGEL-layout folder (tokenizer.json,
                    tokenizer_config.json, ...), loaded with transformers; never trust_remote_code
    load_tokenizer  the folder's tokenizer: `prompt_format.json`'s "tokenizer" kind picks the
                    implementation ("transformers" unless said otherwise; other kinds are plugins
                    registered under the `alphagrpo.tokenizers` entry-point group, e.g. the shapes
                    world's word-level tokenizer)

Special ids are read from the tokenizer by BAGEL's token names (Qwen2.5's <|im_start|>, <|im_end|>,
<|vision_start|>, <|vision_end|>; pad: the tokenizer's pad token, else <|endoftext|>), never
hard-coded, and `check_special_tokens` refuses a tokenizer that disagrees with the model config,
naming both files.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from umm.config import SpecialTokens, UMMConfig
from umm.errors import CheckpointError

SPECIAL_NAMES: dict[str, str] = {"bos": "<|im_start|>", "eos": "<|im_end|>",
                                 "start_of_image": "<|vision_start|>", "end_of_image": "<|vision_end|>"}
PAD_NAMES: tuple[str, ...] = ("<|endoftext|>", "<pad>")
FORMAT_FILE = "prompt_format.json"
ENTRY_POINT_GROUP = "alphagrpo.tokenizers"
HF_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                             "added_tokens.json", "vocab.json", "merges.txt")


class TextTokenizer(Protocol):
    """What the trainer needs of a tokenizer. `source` names the file(s) it was read from (for errors)."""
    source: str

    def encode(self, text: str) -> list[int]: ...          # no special tokens added
    def decode(self, ids: Sequence[int]) -> str: ...       # special tokens skipped
    def token_id(self, token: str) -> int | None: ...      # None when the token is not in the vocabulary
    def pad_token(self) -> str | None: ...                 # the tokenizer's own pad token, if it names one
    def __len__(self) -> int: ...                          # number of ids (added tokens included)


class HFTokenizer:
    """A Hugging Face tokenizer from a checkpoint folder (transformers' AutoTokenizer, local files only)."""

    def __init__(self, directory: str | Path) -> None:
        from transformers import AutoTokenizer

        directory = Path(directory)
        present = [n for n in HF_FILES if (directory / n).exists()]
        if "tokenizer.json" not in present and "vocab.json" not in present:
            raise CheckpointError(f"{directory}: no tokenizer files (expected tokenizer.json or vocab.json + "
                                  "merges.txt, as BAGEL-7B-MoT ships them)")
        self.source = str(directory / present[0])
        try:
            self.tok = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False, local_files_only=True)
        except Exception as e:      # transformers raises many types; name the folder
            raise CheckpointError(f"{directory}: the tokenizer files could not be loaded: {e}") from e
        self._vocab = self.tok.get_vocab()

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids if int(i) < len(self)], skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._vocab.get(token)

    def pad_token(self) -> str | None:
        return self.tok.pad_token

    def __len__(self) -> int:
        return len(self._vocab)


def special_tokens(tok: TextTokenizer) -> SpecialTokens:
    """BAGEL's special ids as this tokenizer assigns them; CheckpointError naming the tokenizer file
    when one is missing."""
    ids: dict[str, int] = {}
    for key, name in SPECIAL_NAMES.items():
        i = tok.token_id(name)
        if i is None:
            raise CheckpointError(f"{tok.source}: the tokenizer has no {name} token (the model's {key}); "
                                  "BAGEL adds it to the Qwen2.5 tokenizer")
        ids[key] = i
    for name in ((tok.pad_token(),) if tok.pad_token() else ()) + PAD_NAMES:
        if tok.token_id(name) is not None:
            ids["pad"] = tok.token_id(name)
            break
    else:
        raise CheckpointError(f"{tok.source}: no pad token (none set, and none of {list(PAD_NAMES)})")
    return SpecialTokens(**ids)


def check_special_tokens(tok: TextTokenizer, cfg: UMMConfig, *, config_file: str | Path) -> None:
    """Refuse a tokenizer whose special ids differ from the model config's, or lie outside its
    vocabulary; the error names the tokenizer file and the config file."""
    found = special_tokens(tok)
    for key, want in vars(cfg.tokens).items():
        got = getattr(found, key)
        if got != want:
            raise CheckpointError(f"{tok.source} gives {key} ({SPECIAL_NAMES.get(key, 'pad')}) id {got}, but "
                                  f"{config_file} says {want}: this tokenizer does not belong to this model")
    if len(tok) > cfg.llm.vocab_size:
        raise CheckpointError(f"{tok.source} has {len(tok)} tokens, more than vocab_size={cfg.llm.vocab_size} "
                              f"of {config_file}: this tokenizer does not belong to this model")


def tokenizer_kind(directory: str | Path) -> str:
    """The "tokenizer" kind a checkpoint's prompt_format.json names ("transformers" without one)."""
    path = Path(directory) / FORMAT_FILE
    if not path.exists():
        return "transformers"
    try:
        return str(json.loads(path.read_text()).get("tokenizer", "transformers"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def load_tokenizer(directory: str | Path) -> TextTokenizer:
    """The checkpoint folder's tokenizer (see the module docstring for how its kind is chosen)."""
    kind = tokenizer_kind(directory)
    if kind == "transformers":
        return HFTokenizer(directory)
    from importlib.metadata import entry_points

    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if kind not in found:
        raise CheckpointError(f"{Path(directory) / FORMAT_FILE}: tokenizer {kind!r} is neither 'transformers' nor "
                              f"a registered plugin ({ENTRY_POINT_GROUP}: {sorted(found)}); is its package installed "
                              "(pip install -e .)?")
    return found[kind].load().from_checkpoint(Path(directory))
