"""Two DeepSpeed ZeRO-3 learner ranks in two Ray actors (gloo on CPU), every tensor partitioned.

    rollout on the tiny model (fixed seeds) -> two halves of 2 trajectories each
    ZeRO-3 step: rank r runs grpo_loss(half r); DeepSpeed averages the gradients, clips, AdamW
    reference:   one process, loss = mean of the two halves' grpo_loss, clip_grad_norm_, torch AdamW
    => gathered learner weights == reference weights (1e-6); then a broadcast to a Ray receiver actor:
       receiver xxh3 == sender's == trainable_checksum() on both learner ranks, weights bitwise equal.
"""
from __future__ import annotations

import functools

import pytest
import torch

from actors.learner import LearnerSpec, LearnerWorker
from actors.weight_sync import BroadcastGroup, WeightReceiver, free_port, model_checksum, trainable_named_parameters
from grpo.policy import FlowConfig, LossConfig, ThinkConfig, grpo_loss, rollout
from umm.context import DrawPrompt, Text
from umm.guidance import CFGConfig

from tests.umm.helpers import tiny_model

THINK = ThinkConfig(max_new_tokens=6, temperature=1.0, top_p=0.9)
FLOW = FlowConfig(num_steps=6, shift=3.0, window_size=3, window_start=(0, 1), noise_level=0.7,
                  cfg=CFGConfig(text_scale=3.0, interval=(0.4, 1.0)))
HW = (2, 2)
HYPER = dict(lr=5e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4, grad_clip=1.0)
BUCKET = 64 << 10
TIMEOUT = 300



def grpo_loss_fn(model, batch):
    """A learner loss: the GRPO objective of one shard (prompts, rollout, advantages), mean over it."""
    prompts, ro, adv = batch
    res = grpo_loss(model, prompts, ro, adv, think=THINK, cfg=FLOW.cfg, loss=LossConfig())
    return res.loss, {"loss/image": res.image_loss, "loss/text": res.text_loss}


def halves() -> list[tuple]:
    """Two shards of 2 trajectories each, sampled by the initial weights (on-policy)."""
    model = tiny_model(seed=0)
    out = []
    for h in range(2):
        prompts = [DrawPrompt(prefix=[Text(ids=(20, 21))], text=Text(ids=tuple(range(30, 32 + (2 * h + i) % 3))))
                   for i in range(2)]
        ro = rollout(model, prompts, hw=HW, think=THINK, flow=FLOW, generator=torch.Generator().manual_seed(h))
        out.append((prompts, ro, torch.tensor([1.0, -0.5]) * (h + 1)))
    return out


class ReceiverActor:
    """A stand-in rollout actor: holds a policy (different weights until synced) and a WeightReceiver."""

    def __init__(self):
        torch.set_num_threads(1)
        self.model = tiny_model(seed=7)
        self.receiver = WeightReceiver(self.model, bucket_bytes=BUCKET)
        self.group = None

    def join_weight_group(self, addr, port, world_size, rank, allow_shared):
        self.group = BroadcastGroup(host=addr, port=port, rank=rank, world_size=world_size)
        return self.group.open_lane(trainable_named_parameters(self.model), allow_shared=allow_shared)

    def load_weights(self, manifest):
        return self.receiver.receive(self.group, manifest)

    def ready_for(self, version):
        return self.receiver.ready_for(version)

    def trainable_weights(self):
        return {n: p.detach().clone() for n, p in trainable_named_parameters(self.model)}

    def checksum(self):
        return model_checksum(self.model)


def test_spec_validation_names_the_field():
    spec = LearnerSpec(rank=2, world_size=2, master_port=1234, model_factory=tiny_model)
    with pytest.raises(ValueError, match="LearnerSpec.rank"):
        spec.validate()
    cfg = LearnerSpec(rank=0, world_size=2, master_port=1234, model_factory=tiny_model,
                      persistence_threshold=0).deepspeed_config()
    assert cfg["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0,
                                        "stage3_max_reuse_distance": 0}
    deepspeed_default = LearnerSpec(rank=0, world_size=2, model_factory=tiny_model, max_reuse_distance=None)
    assert "stage3_max_reuse_distance" not in deepspeed_default.deepspeed_config()["zero_optimization"]
    with pytest.raises(ValueError, match="LearnerSpec.max_reuse_distance"):
        LearnerSpec(rank=0, world_size=2, model_factory=tiny_model, max_reuse_distance=-1).validate()
    no_port = LearnerWorker(LearnerSpec(rank=0, world_size=1, model_factory=tiny_model))
    with pytest.raises(ValueError, match="master_port"):
        no_port.setup()


def _two_learners(ray, factory, **kw):
    Learner = ray.remote(num_cpus=0)(LearnerWorker)
    learners = [Learner.remote(LearnerSpec(rank=r, world_size=2, model_factory=factory, persistence_threshold=0,
                                           bucket_bytes=BUCKET, seed=0, **HYPER, **kw)) for r in range(2)]
    addr, port = ray.get(learners[0].rendezvous.remote(), timeout=TIMEOUT)   # rank 0's node, a free port there
    assert addr == "127.0.0.1"                                                 # the local test cluster's node IP
    return learners, [lr.setup.remote(addr, port) for lr in learners]


def _close(ray, learners):
    ray.get([lr.shutdown.remote() for lr in learners], timeout=60)
    for lr in learners:
        ray.kill(lr)


@pytest.fixture(scope="module")
def stepped(ray_cluster):
    """Two learner actors after one train_step on their halves; yields (learners, results, shards)."""
    import ray

    learners, setups = _two_learners(ray, functools.partial(tiny_model, seed=0))
    infos = ray.get(setups, timeout=TIMEOUT)
    shards = halves()
    results = ray.get([lr.train_step.remote(grpo_loss_fn, shard) for lr, shard in zip(learners, shards)],
                      timeout=TIMEOUT)
    yield learners, infos, results, shards
    _close(ray, learners)


@pytest.mark.ray
@pytest.mark.deepspeed
@pytest.mark.slow
def test_zero3_step_equals_single_process_adamw(stepped):
    import ray

    learners, infos, results, shards = stepped
    assert all(i["partitioned_tensors"] == i["tensors"] for i in infos)   # ZeRO-3 really partitions
    assert [r.version for r in results] == [1, 1]
    state = ray.get([lr.state_dict_for_eval.remote() for lr in learners], timeout=TIMEOUT)[0]

    ref = tiny_model(seed=0)
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"],
                            weight_decay=HYPER["weight_decay"])
    loss = (grpo_loss_fn(ref, shards[0])[0] + grpo_loss_fn(ref, shards[1])[0]) / 2
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, HYPER["grad_clip"])
    opt.step()

    assert results[0].loss == pytest.approx(float(loss.detach()), abs=1e-6)
    assert results[0].grad_norm == pytest.approx(float(grad_norm), rel=1e-5) and float(grad_norm) > HYPER["grad_clip"]
    moved = max((p.detach() - start[n]).abs().max().item() for n, p in ref.named_parameters())
    assert moved > 10 * 1e-6                                                # the step is not a no-op
    for n, p in ref.named_parameters():
        torch.testing.assert_close(state[n], p.detach(), rtol=0, atol=1e-6, msg=lambda m: f"{n}: {m}")


@pytest.mark.ray
@pytest.mark.deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("lane", ["gloo", "shared"])
def test_broadcast_after_step_reaches_a_receiver_with_the_learners_checksum(stepped, lane):
    import ray

    learners = stepped[0]
    receiver = ray.remote(num_cpus=0)(ReceiverActor).remote()
    port = free_port()
    shared = lane == "shared"
    lanes = ray.get([lr.join_weight_group.remote("127.0.0.1", port, 2, shared) for lr in learners]
                    + [receiver.join_weight_group.remote("127.0.0.1", port, 2, 1, shared)], timeout=TIMEOUT)
    assert lanes == [lane, None, lane]                                     # learner rank 1 is not in the group
    manifest = ray.get(learners[0].weight_manifest.remote(), timeout=TIMEOUT)
    assert manifest.version == 1 and len(manifest.buckets) > 1
    assert not ray.get(receiver.ready_for.remote(1))
    *sent, got = ray.get([lr.broadcast_weights.remote() for lr in learners] + [receiver.load_weights.remote(manifest)],
                         timeout=TIMEOUT)
    assert sent[0].bytes == got.bytes == manifest.total_bytes and sent[0].checksum == got.checksum
    assert sent[1].bytes == 0 and sent[1].checksum is None                 # rank 1 only took part in gathers
    learner_sums = ray.get([lr.trainable_checksum.remote() for lr in learners], timeout=TIMEOUT)
    assert learner_sums[0] == learner_sums[1] == ray.get(receiver.checksum.remote())
    if lane == "gloo":
        assert sent[0].buckets == got.buckets == len(manifest.buckets) and sent[0].checksum == learner_sums[0]
    else:
        assert sent[0].receivers_verified is True
    assert ray.get(receiver.ready_for.remote(1))
    weights = ray.get(receiver.trainable_weights.remote())
    state = ray.get([lr.state_dict_for_eval.remote() for lr in learners], timeout=TIMEOUT)[0]
    assert all(torch.equal(weights[n], state[n]) for n in manifest.names)
    ray.kill(receiver)


@pytest.mark.ray
@pytest.mark.deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_zero3_learners_build_the_checkpoint_partitioned(ray_cluster, tmp_path, lora):
    """From a checkpoint directory (the trainer's factory), ZeRO-3 ranks build the model under zero.Init:
    every tensor is already a partition before deepspeed.initialize, and the gathered weights equal the
    checkpoint's (the whole-model load_policy path, computed here in one process)."""
    import ray

    from grpo.loading import LoRASection, PolicyConfig, PolicyFactory, load_policy
    from umm.checkpoint import save_pretrained

    source = tiny_model(seed=0)
    policy = PolicyConfig(checkpoint=str(save_pretrained(source, tmp_path / "ckpt")),
                          lora=LoRASection(enabled=lora, rank=4, alpha=8.0))
    learners, setups = _two_learners(ray, PolicyFactory(policy))
    infos = ray.get(setups, timeout=TIMEOUT)
    n_base = len(list(source.parameters()))
    for info in infos:
        assert info["partitioned_at_build"] == n_base          # partitions from the start, LoRA's added after
        assert info["partitioned_tensors"] == info["tensors"]  # and everything by the time the engine exists
    torch.manual_seed(0)                                       # LoRA's A matrices: the learner's seed
    reference = load_policy(policy)
    assert ray.get([lr.trainable_checksum.remote() for lr in learners], timeout=TIMEOUT) == [model_checksum(reference)] * 2
    state = ray.get([lr.state_dict_for_eval.remote() for lr in learners], timeout=TIMEOUT)[0]  # a collective
    expected = dict(reference.named_parameters())
    assert state.keys() >= expected.keys()
    for name, p in expected.items():
        assert torch.equal(state[name], p.detach()), name
    if not lora:
        assert infos[0]["trainable_tensors"] == sum(p.requires_grad for p in source.parameters())
    else:
        assert infos[0]["trainable_tensors"] == len([n for n in expected if ".lora_" in n]) > 0
    _close(ray, learners)


@pytest.mark.ray
@pytest.mark.deepspeed
@pytest.mark.slow
def test_zero3_build_from_a_checkpoint_missing_a_tensor_fails_on_every_rank(ray_cluster, tmp_path):
    import ray
    from safetensors.torch import load_file, save_file

    from grpo.loading import PolicyConfig, PolicyFactory
    from umm.checkpoint import save_pretrained

    ckpt = save_pretrained(tiny_model(seed=0), tmp_path / "ckpt")
    tensors = load_file(str(ckpt / "ema.safetensors"))
    dropped = "llm2vae.bias"
    del tensors[dropped]
    save_file(tensors, str(ckpt / "ema.safetensors"))
    learners, setups = _two_learners(ray, PolicyFactory(PolicyConfig(checkpoint=str(ckpt))))
    for setup in setups:                   # both ranks raise (checked before any gather): none is left waiting
        with pytest.raises(ray.exceptions.RayTaskError, match=rf"ema.safetensors(.|\n)*{dropped}"):
            ray.get(setup, timeout=TIMEOUT)
    _close(ray, learners)
