"""Quality scores: near 1 on clean renders, lower with stray blobs or a noisy background."""
import random

import numpy as np

from shapes.layout import sample_scene
from shapes.prompts import generate
from shapes.quality import QUALITY_KEYS, quality
from shapes.scene import render


def _renders(n=12, canvas_size=48):
    rng = random.Random(7)
    for i in range(n):
        family = ("single_object", "counting", "color_attr", "position")[i % 4]
        yield np.array(render(sample_scene(generate(family, rng).meaning, rng, canvas_size=canvas_size)))


def test_clean_renders_score_one():
    for arr in _renders():
        q = quality(arr)
        assert set(q) == set(QUALITY_KEYS)
        assert all(v >= 0.99 for v in q.values()), q


def test_noise_blobs_lower_no_stray_blobs():
    rng = np.random.default_rng(0)
    for arr in _renders(6):
        bg = np.argwhere((arr == 255).all(-1))
        for y, x in bg[rng.choice(len(bg), 4, replace=False)]:
            arr[y, x] = (0, 0, 0) if rng.random() < 0.5 else (140, 40, 170)
        q = quality(arr)
        assert q["no_stray_blobs"] < 0.5 and q["plain_background"] < 1.0


def test_noisy_background_lowers_plain_background_and_clean_edges():
    rng = np.random.default_rng(1)
    for arr in _renders(6):
        noisy = np.clip(arr + rng.normal(0, 20, arr.shape), 0, 255).astype(np.uint8)
        q = quality(noisy)
        assert q["plain_background"] < 0.6 and q["clean_edges"] < 0.95
        assert all(0.0 <= v <= 1.0 for v in q.values())
