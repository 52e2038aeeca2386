"""The shipped policy (checkpoints/shapes-base) loads and draws images the judge can parse."""
from pathlib import Path

import numpy as np

from shapes.benchmark import benchmark_prompts
from shapes.detect import analyse
from shapes.evaluate import PROMPT_FORMAT, DrawConfig, draw, shapes_prompter
from shapes.judge import judge
from shapes.tokenizer import build_tokenizer, load as load_tokenizer
from umm.checkpoint import load_pretrained
from umm.prompting import PromptFormat

SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "shapes-base"


def test_shipped_checkpoint_loads_with_its_tokenizer():
    model = load_pretrained(SHIPPED)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) < 20 * 2**20
    shipped, built = load_tokenizer(SHIPPED / "tokenizer.json"), build_tokenizer()
    assert shipped.get_vocab() == built.get_vocab()
    assert PromptFormat.load(SHIPPED) == PROMPT_FORMAT          # the world's chat format rides with it


def test_shipped_checkpoint_draws_judgeable_images():
    model = load_pretrained(SHIPPED).eval()
    prompts = [p for p in benchmark_prompts() if p.family == "single_object"][:6]
    images, _ = draw(model, shapes_prompter(), prompts, cfg=DrawConfig(num_steps=12, text_scale=2.0))
    found = 0
    for p, img in zip(prompts, images):
        arr = np.asarray(img)
        assert arr.shape == (32, 32, 3)
        found += len(analyse(arr).detections)
        judge(img, p.meaning)                      # parses without error
    assert found >= 3, "the shipped policy should draw recognisable objects on most prompts"


def test_evaluation_shards_pool_to_the_whole_evaluation():
    """Image k has fixed seeds whoever draws it: shards {0, 2} + {1} equal one pass over 3 images."""
    import pytest
    from shapes.evaluate import accuracy, evaluate

    model = load_pretrained(SHIPPED).eval()
    tok = shapes_prompter()
    # two prompts of two GenEval categories and of edits (drawn in their own batches)
    prompts = [p for c in ("single_object", "colors", "edit")
               for p in [q for q in benchmark_prompts() if q.family == c][:2]]
    cfg = DrawConfig(num_steps=4, text_scale=2.0)
    whole_acc, whole = evaluate(model, tok, prompts, cfg=cfg, images_per_prompt=3, progress=False)
    parts = [evaluate(model, tok, prompts, cfg=cfg, images_per_prompt=3, shard=(j, 2), progress=False)[1]
             for j in range(2)]
    assert all(parts) and sum(map(len, parts)) == len(whole) == 18      # 6 batches (edits apart), 3 + 3
    key = lambda s: (s[0].id, np.asarray(s[1]).tobytes())
    assert sorted(map(key, whole)) == sorted(key(s) for part in parts for s in part)
    pooled = accuracy((s[0].family, s[2]) for part in parts for s in part)
    assert pooled == whole_acc
    # accuracy itself, against a count by hand: geneval_mean averages the GenEval categories only (not edit)
    by_hand = {}
    for fam in {s[0].family for s in whole}:
        oks = [s[2] for s in whole if s[0].family == fam]
        by_hand[fam] = sum(oks) / len(oks)
    assert {k: v for k, v in whole_acc.items() if k != "geneval_mean"} == pytest.approx(by_hand)
    assert whole_acc["geneval_mean"] == pytest.approx((by_hand["single_object"] + by_hand["colors"]) / 2)
    with pytest.raises(ValueError, match="shard"):
        evaluate(model, tok, prompts, cfg=cfg, images_per_prompt=2, shard=(2, 2), progress=False)
