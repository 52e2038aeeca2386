"""A random tiny BAGEL in the exact public layout, to try the real path on a CPU:
`python -m umm.make_tiny --out DIR [--seed 0]`.

Writes what the BAGEL-7B-MoT download holds, at toy sizes and nothing more (no umm_config.json):

    llm_config.json      Qwen2-style decoder config (MoT layer module, qk_norm)
    vit_config.json      SigLIP config (counts the layer BAGEL drops, as the public file does)
    ema.safetensors      every model tensor under BAGEL's names, random
    ae.safetensors       a FLUX-named autoencoder (2 levels of 32 channels: 2x downsampling, 4 latent
                         channels), random
    tokenizer.json       a byte-level BPE trained here on a small built-in corpus (nothing downloaded),
    tokenizer_config.json  with BAGEL's special tokens appended after the learned vocabulary, as Qwen2.5
                         has them: <|endoftext|> (pad), <|im_start|>, <|im_end|>, <|vision_start|>,
                         <|vision_end|>; their ids are whatever the training gives (read them, never
                         assume them)

Everything the trainer needs is then read back from the folder alone (umm.checkpoint.read_config,
umm.tokenizer), exactly as for the real download. The model is random: it draws noise-like images
and writes gibberish plans, which is all a plumbing test needs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from umm.config import LLMConfig, SpecialTokens, UMMConfig, VAEConfig, ViTConfig
from umm.model import UnifiedModel
from umm.tokenizer import PAD_NAMES, SPECIAL_NAMES

BPE_VOCAB = 1000          # learned tokens (bytes + merges); the specials come after
CORPUS_WORDS = (
    "a an the photo picture image drawing of and with on in at to is are there one two three four five six "
    "red orange yellow green blue purple pink brown black white gray "
    "person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop sign parking "
    "meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie "
    "suitcase frisbee skis snowboard sports ball kite baseball bat glove skateboard surfboard tennis racket "
    "bottle wine glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot pizza donut "
    "cake chair couch potted plant bed dining table toilet tv laptop mouse remote keyboard cell phone "
    "microwave oven toaster sink refrigerator book clock vase scissors teddy hair drier toothbrush "
    "left right above below next behind front of under over "
    "circle square triangle star heart shape colour color count many as same "
    "think plan draw the image should show yes no wrong fix edit make it change"
)


def tiny_config(vocab_size: int, tokens: SpecialTokens) -> UMMConfig:
    """Toy sizes with the real model's structure (head_dim 32; FLUX-style AE with 2 levels)."""
    return UMMConfig(
        llm=LLMConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, rope_theta=10000.0,
                      max_position_embeddings=4096),
        vit=ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                      patch_size=4),
        vae=VAEConfig(kind="kl", downsample=2, z_channels=4, block_out_channels=(32, 32), layers_per_block=1,
                      norm_num_groups=32),
        tokens=tokens, latent_patch_size=2, max_latent_size=32, vit_max_num_patch_per_side=32,
    ).validate()


def build_tokenizer(out: Path) -> int:
    """Train the byte-level BPE and write the Hugging Face tokenizer files; returns len(tokenizer)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    from umm.prompting import REFLECT_SYSTEM, THINK_SYSTEM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    corpus = [CORPUS_WORDS, THINK_SYSTEM, REFLECT_SYSTEM, "<think> </think>"] * 20
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    specials = [PAD_NAMES[0], *SPECIAL_NAMES.values()]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": SPECIAL_NAMES["eos"],
              "pad_token": PAD_NAMES[0], "unk_token": None, "model_max_length": 4096,
              "clean_up_tokenization_spaces": False, "errors": "replace", "split_special_tokens": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok.get_vocab_size()


def randomise(model: UnifiedModel, *, seed: int) -> None:
    """Random weights everywhere a zero or one init would hide bugs (BAGEL zero-inits llm2vae; norms
    start at one), fixed position tables left as built."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("pos_embed"):
                continue
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.5 * noise / max(1, p.shape[-1]) ** 0.5)


def make_tiny(out: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny public-layout checkpoint to `out` (created; files replaced atomically)."""
    from umm.checkpoint import save_pretrained
    from umm.tokenizer import load_tokenizer, special_tokens

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_tokens = build_tokenizer(out)
    tokens = special_tokens(load_tokenizer(out))
    vocab = -(-n_tokens // 64) * 64                     # padded like Qwen2.5's 152064 > len(tokenizer)
    torch.manual_seed(seed)
    model = UnifiedModel(tiny_config(vocab, tokens))
    randomise(model, seed=seed)
    save_pretrained(model, out, public_layout=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="write a random tiny BAGEL in the public checkpoint layout")
    ap.add_argument("--out", required=True, help="folder to write (created)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = make_tiny(args.out, seed=args.seed)
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {out}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
