"""The shipped policy (checkpoints/shapes-base) loads and draws images the judge can parse."""
from pathlib import Path

import numpy as np

from shapes.benchmark import benchmark_prompts
from shapes.detect import analyse
from shapes.evaluate import DrawConfig, draw
from shapes.judge import judge
from shapes.tokenizer import build_tokenizer, load as load_tokenizer
from umm.checkpoint import load_pretrained

SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "shapes-base"


def test_shipped_checkpoint_loads_with_its_tokenizer():
    model = load_pretrained(SHIPPED, base="shapes")
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) < 20 * 2**20
    shipped, built = load_tokenizer(SHIPPED / "tokenizer.json"), build_tokenizer()
    assert shipped.get_vocab() == built.get_vocab()


def test_shipped_checkpoint_draws_judgeable_images():
    model = load_pretrained(SHIPPED, base="shapes").eval()
    prompts = [p for p in benchmark_prompts() if p.family == "single_object"][:6]
    images, _ = draw(model, build_tokenizer(), prompts, cfg=DrawConfig(num_steps=12, text_scale=2.0))
    found = 0
    for p, img in zip(prompts, images):
        arr = np.asarray(img)
        assert arr.shape == (32, 32, 3)
        found += len(analyse(arr).detections)
        judge(img, p.meaning)                      # parses without error
    assert found >= 3, "the shipped policy should draw recognisable objects on most prompts"
