"""Building a learner's policy already partitioned (ZeRO-3), then filling it from its checkpoint.

    every rank:  with deepspeed.zero.Init(ds_config):  model = source.skeleton()
                     (each module is partitioned as soon as it is built: a rank holds 1/W of it)
                 source.weights().check(model's names and full shapes)      (same verdict everywhere)
                 for bucket in buckets of the parameters (weight_sync.plan_buckets):
                     GatheredParameters(bucket, modifier_rank=0):  rank 0 copies the file's tensors
                     (on leaving, rank 0's values are broadcast and re-partitioned)
                 model = source.finish(model)                               (LoRA adapters, if any)

Without it every rank materialises the whole model before `deepspeed.initialize` partitions it (and
`load_policy` briefly holds two copies): for BAGEL-7B in fp32 that is ~28 GB per rank, times the
ranks on a node. With it a rank's peak is its partition plus one gathered bucket.

A source is what `grpo.loading.PolicyFactory` is: callable (the whole model, used elsewhere)
with `skeleton()`, `weights()` (`.check(shapes)`, `.get(name)`) and `finish(model)`. A plain callable
factory (tests' tiny models) is built whole and partitioned by `deepspeed.initialize`, as before.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from actors.weight_sync import full_shape, gathered, nbytes_of, plan_buckets


def builds_partitioned(factory: Any) -> bool:
    """Whether `factory` can build the model partitioned (has skeleton/weights/finish)."""
    return all(callable(getattr(factory, name, None)) for name in ("skeleton", "weights", "finish"))


def load_weights(model: nn.Module, weights: Any, *, rank: int, bucket_bytes: int) -> int:
    """Fill every parameter of `model` from `weights` (`check(shapes)`, `get(name)`), gathering
    bucket by bucket; under ZeRO-3 only rank 0 reads the file. A COLLECTIVE when the model is
    partitioned: every rank calls it. Names and shapes are checked on every rank before the first
    gather, so a bad checkpoint raises everywhere instead of leaving ranks waiting. Returns the
    number of buckets."""
    named = list(model.named_parameters())
    weights.check({n: full_shape(p) for n, p in named})
    buckets = plan_buckets([nbytes_of(full_shape(p), p.dtype) for _, p in named], bucket_bytes)
    for start, end in buckets:
        chunk = named[start:end]
        partitioned = any(hasattr(p, "ds_id") for _, p in chunk)
        with gathered([p for _, p in chunk], modifier_rank=0):
            if rank == 0 or not partitioned:
                with torch.no_grad():
                    for name, p in chunk:
                        p.data.copy_(weights.get(name).to(dtype=p.dtype))
    return len(buckets)


def build_partitioned(factory: Any, ds_config: dict, *, rank: int, bucket_bytes: int) -> nn.Module:
    """The policy built under `deepspeed.zero.Init` and loaded from `factory.weights()` (see above)."""
    import deepspeed

    # mem_efficient_linear=False: zero.Init would otherwise replace torch.nn.functional.linear
    # process-wide with its own autograd function
    with deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False):
        model = factory.skeleton()
    load_weights(model, factory.weights(), rank=rank, bucket_bytes=bucket_bytes)
    return factory.finish(model)
