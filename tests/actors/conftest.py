"""Fixtures of the actor tests (the Ray cluster fixture lives in tests/conftest.py)."""
import pytest


@pytest.fixture(scope="session")
def make_samples():
    """make_samples(seed, per_family) -> [(DecomposeRequest, uint8 image of a correct render)], every
    prompt family `per_family` times (32 px canvases, deterministic in `seed`)."""
    import random

    import numpy as np

    from reward_service.backends import DecomposeRequest
    from shapes.layout import sample_scene
    from shapes.prompts import FAMILIES, generate
    from shapes.scene import render

    def make(seed: int, per_family: int = 2):
        rng = random.Random(seed)
        out = []
        for family in FAMILIES:
            for _ in range(per_family):
                prompt = generate(family, rng, canvas_size=32)
                image = np.asarray(render(sample_scene(prompt.meaning, rng, canvas_size=32)), dtype=np.uint8)
                out.append((DecomposeRequest(prompt=prompt.text, meaning=prompt.meaning), image))
        return out

    return make
