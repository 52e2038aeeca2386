"""A checkpoint's tokenizer and prompt format (umm.tokenizer, umm.prompting) on the tiny public-layout
BAGEL that `python -m umm.make_tiny` writes: ids read from the tokenizer, checked against the model."""
import json
import shutil
import subprocess
import sys

import pytest

from umm.checkpoint import UMM_JSON, load_pretrained, read_config, save_pretrained
from umm.errors import CheckpointError
from umm.make_tiny import make_tiny
from umm.prompting import THINK_SYSTEM, PromptFormat, Prompter
from umm.tokenizer import HFTokenizer, check_special_tokens, load_tokenizer, special_tokens


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny-bagel"), seed=0)


def test_make_tiny_writes_the_public_layout_and_everything_is_read_from_it(tiny_dir):
    assert sorted(p.name for p in tiny_dir.iterdir()) == [
        "ae.safetensors", "ema.safetensors", "llm_config.json", "tokenizer.json", "tokenizer_config.json",
        "vit_config.json"]
    cfg = read_config(tiny_dir)                                    # no umm_config.json, no preset
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(tiny_dir))
    ids = {name: hf.convert_tokens_to_ids(name) for name in
           ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>")}
    assert (cfg.tokens.bos, cfg.tokens.eos, cfg.tokens.start_of_image, cfg.tokens.end_of_image, cfg.tokens.pad) == \
        tuple(ids.values())
    assert min(ids.values()) >= len(hf) - 5 and cfg.llm.vocab_size >= len(hf)      # appended, as in Qwen2.5
    assert (cfg.vae.z_channels, cfg.vae.block_out_channels, cfg.vae.downsample) == (4, (32, 32), 2)
    assert (cfg.latent_patch_size, cfg.max_latent_size, cfg.vit_max_num_patch_per_side) == (2, 32, 32)
    model = load_pretrained(tiny_dir)
    assert model.cfg == cfg and model.latent_grid(32, 32) == (8, 8)


def test_tokenizer_round_trip_and_the_bagel_prompt_layout(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    assert isinstance(tok, HFTokenizer) and tok.source.endswith("tokenizer.json")
    text = "a photo of two red zebras, left of a bench <think> count them </think>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and all(i < len(tok) for i in ids)
    special = special_tokens(tok)
    assert special.bos not in ids and tok.decode(ids + [special.eos, special.pad]) == text     # specials skipped
    p = Prompter(tok)
    d = p.draw(text, think=True)
    assert d.prefix[0].ids == tuple(tok.encode(THINK_SYSTEM)) and d.text.ids == tuple(ids)   # no role lines
    assert p.draw(text, think=False).prefix == []
    assert p.length(d) == len(tok.encode(THINK_SYSTEM)) + 2 + len(ids) + 2                  # markers counted
    assert p.plan_text(tok.encode("<think> a plan </think>") + [special.eos]) == "<think> a plan </think>"


def test_a_tokenizer_that_disagrees_with_the_model_config_is_refused_naming_both_files(tiny_dir, tmp_path):
    from grpo.loading import load_prompter
    model = load_pretrained(tiny_dir)
    ours = save_pretrained(model, tmp_path / "ours", copy_files=[tiny_dir / "tokenizer.json",
                                                                 tiny_dir / "tokenizer_config.json"])
    load_prompter(ours, read_config(ours))                         # umm_config.json and tokenizer agree
    cfg = json.loads((ours / UMM_JSON).read_text())
    cfg["tokens"]["eos"] += 1
    (ours / UMM_JSON).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tokenizer.json gives eos \(<\|im_end\|>\) id \d+, but .*umm_config.json"):
        load_prompter(ours, read_config(ours))
    small = tmp_path / "small"                                    # a public folder whose vocab is too small
    shutil.copytree(tiny_dir, small)
    llm = json.loads((small / "llm_config.json").read_text())
    llm["vocab_size"] = 512
    (small / "llm_config.json").write_text(json.dumps(llm))
    with pytest.raises(CheckpointError, match=r"small: tokens.bos: id \d+ outside vocab of 512"):
        read_config(small)
    tok = load_tokenizer(tiny_dir)
    cfg_small = read_config(tiny_dir)
    cfg_small.llm.vocab_size = len(tok) - 1
    with pytest.raises(CheckpointError, match=r"tokenizer.json has \d+ tokens, more than vocab_size=\d+ of .*x.json"):
        check_special_tokens(tok, cfg_small, config_file="x.json")


def test_missing_tokenizer_and_bad_prompt_format_name_the_file(tiny_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_dir, bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    with pytest.raises(CheckpointError, match=r"bare: no tokenizer files"):
        read_config(bare)
    fmt = tmp_path / "fmt"
    shutil.copytree(tiny_dir, fmt)
    (fmt / "prompt_format.json").write_text(json.dumps({"tokenizer": "transformers", "think_sytem": "x"}))
    with pytest.raises(CheckpointError, match=r"prompt_format.json: unknown keys \['think_sytem'\]"):
        Prompter.from_checkpoint(fmt)
    (fmt / "prompt_format.json").write_text(json.dumps({"tokenizer": "sentencepiece"}))
    with pytest.raises(CheckpointError, match=r"tokenizer 'sentencepiece' is neither 'transformers' nor a registered"):
        load_tokenizer(fmt)
    PromptFormat(think_system="plan first.").save(fmt)
    assert Prompter.from_checkpoint(fmt).fmt == PromptFormat(think_system="plan first.")


def test_make_tiny_command_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "umm.make_tiny", "--out", str(tmp_path / "t")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout and (tmp_path / "t" / "ema.safetensors").exists()
