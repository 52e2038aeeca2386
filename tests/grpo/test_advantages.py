"""grpo.advantages against a plain python loop."""
import math

import pytest
import torch

from grpo.advantages import compute_advantages, drop_zero_variance


def _pstd(values):
    mu = sum(values) / len(values)
    return math.sqrt(sum((v - mu) ** 2 for v in values) / len(values))


def _loop_advantages(rewards, groups, *, std_scope, eps, clip):
    """The same definition written as loops over python floats."""
    out = []
    for r, g in zip(rewards, groups):
        members = [rr for rr, gg in zip(rewards, groups) if gg == g]
        mean = sum(members) / len(members)
        std = _pstd(rewards) if std_scope == "batch" else _pstd(members)
        a = (r - mean) / (std + eps)
        if max(members) - min(members) <= 1e-8:
            a = 0.0
        out.append(max(-clip, min(clip, a)))
    return out


@pytest.mark.parametrize("std_scope", ["batch", "group"])
def test_matches_loop_with_unequal_group_sizes(std_scope):
    gen = torch.Generator().manual_seed(0)
    groups = [7, 7, 7, 3, 3, 11, 11, 11, 11, 5]  # sizes 3, 2, 4, 1; ids unsorted and sparse
    rewards = torch.rand(len(groups), generator=gen, dtype=torch.float64)
    res = compute_advantages(rewards.float(), torch.tensor(groups), std_scope=std_scope)
    want = _loop_advantages(rewards.float().double().tolist(), groups, std_scope=std_scope, eps=1e-4, clip=5.0)
    assert res.adv.dtype == torch.float32 and res.adv.shape == (10,)
    assert torch.allclose(res.adv, torch.tensor(want, dtype=torch.float32), atol=1e-5)
    assert res.group_ids_unique.tolist() == [3, 5, 7, 11]
    assert res.group_sizes.tolist() == [2, 1, 3, 4]
    assert [res.group_ids_unique[i].item() for i in res.group_index] == groups
    assert res.zero_variance_groups == [5]  # a group of one has no variance


def test_group_means_are_removed():
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    res = compute_advantages(torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0]), groups, std_scope="group")
    for g in (0, 1):
        assert res.adv[groups == g].sum().abs() < 1e-5


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_clip_and_counts(sign):
    """Both tails are clipped, at the default clip of 5."""
    rewards = sign * torch.tensor([0.0] * 99 + [100.0])  # one outlier: |100 - 1| / std(batch) ~ 9.9 > 5
    res = compute_advantages(rewards, torch.zeros(100, dtype=torch.long))
    assert res.adv[-1] == sign * 5.0 and res.n_clipped == 1
    want = _loop_advantages(rewards.tolist(), [0] * 100, std_scope="batch", eps=1e-4, clip=5.0)
    assert torch.allclose(res.adv, torch.tensor(want), atol=1e-5)


def test_clip_counts_only_the_values_it_changes():
    """n_clipped counts |adv| > clip: an advantage exactly at the clip is kept as it is and not counted.
    Any clip > 0 is allowed, one below 1 too."""
    rewards, groups = torch.tensor([0.0, 1.0]), torch.tensor([0, 0])  # mean 0.5, std 0.5: adv = -1, +1 (eps 0)
    at = compute_advantages(rewards, groups, eps=0.0, clip=1.0)
    assert at.adv.tolist() == [-1.0, 1.0] and at.n_clipped == 0
    below = compute_advantages(rewards, groups, eps=0.0, clip=0.5)
    assert below.adv.tolist() == [-0.5, 0.5] and below.n_clipped == 2


def test_zero_variance_reported_and_dropped():
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.1, 0.9, 0.3, 0.3])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    res = compute_advantages(rewards, groups)
    assert res.zero_variance_groups == [0, 2] and res.n_zero_variance_samples == 5
    assert torch.equal(res.adv[[0, 1, 2, 5, 6]], torch.zeros(5))
    keep, n_dropped = drop_zero_variance(res)
    assert keep.tolist() == [False, False, False, True, True, False, False] and n_dropped == 5
    keep_all, none = drop_zero_variance(compute_advantages(torch.tensor([0.0, 1.0]), torch.tensor([4, 4])))
    assert keep_all.all() and none == 0


def test_zero_variance_tolerance_is_inclusive():
    """A group whose max - min equals zero_variance_tol exactly is zero-variance (the rule is <= tol)."""
    rewards = torch.tensor([0.0, 0.25, 0.0, 1.0], dtype=torch.float64)  # ranges 0.25 and 1, both exact
    res = compute_advantages(rewards, torch.tensor([0, 0, 1, 1]), zero_variance_tol=0.25)
    assert res.zero_variance_groups == [0] and res.n_zero_variance_samples == 2
    assert res.adv[:2].tolist() == [0.0, 0.0] and res.adv[2] < 0 < res.adv[3]


def test_all_equal_batch_gives_zero_not_nan():
    res = compute_advantages(torch.ones(6), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert torch.equal(res.adv, torch.zeros(6))
    # without eps the guard alone keeps 0 / 0 out
    for scope in ("batch", "group"):
        res = compute_advantages(torch.ones(6), torch.tensor([0, 0, 0, 1, 1, 1]), std_scope=scope, eps=0.0)
        assert torch.equal(res.adv, torch.zeros(6)), scope


def test_rounding_noise_inside_a_group_is_not_amplified_into_a_signal():
    """Rewards that differ only by float noise (<= zero_variance_tol) are one reward: advantage 0. Per-group
    std would otherwise blow the noise up to +-1 (and the clip would not stop it)."""
    rewards = torch.tensor([0.5, 0.5 + 3e-9, 0.5 - 2e-9, 0.2, 0.9, 0.4], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    res = compute_advantages(rewards, groups, std_scope="group", eps=0.0)
    assert torch.equal(res.adv[:3], torch.zeros(3)) and res.zero_variance_groups == [0]
    want = _loop_advantages(rewards.tolist(), groups.tolist(), std_scope="group", eps=0.0, clip=5.0)
    assert torch.allclose(res.adv, torch.tensor(want, dtype=torch.float32), atol=1e-6)
    assert res.adv[3:].abs().max() > 0.5


@pytest.mark.parametrize(
    "rewards,group_ids,kwargs,name",
    [
        (torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.long), {}, "rewards"),
        (torch.ones(0), torch.zeros(0, dtype=torch.long), {}, "rewards"),
        (torch.ones(3), torch.zeros(2, dtype=torch.long), {}, "group_ids"),
        (torch.ones(3), torch.zeros(3), {}, "group_ids"),
        (torch.tensor([1.0, float("nan")]), torch.zeros(2, dtype=torch.long), {}, "rewards"),
        (torch.ones(3), torch.zeros(3, dtype=torch.long), {"std_scope": "prompt"}, "std_scope"),
        (torch.ones(3), torch.zeros(3, dtype=torch.long), {"eps": -1.0}, "eps"),
        (torch.ones(3), torch.zeros(3, dtype=torch.long), {"clip": 0.0}, "clip"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(rewards, group_ids, kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} must"):
        compute_advantages(rewards, group_ids, **kwargs)


def test_results_stay_on_the_inputs_device_whatever_the_default_device():
    """Every tensor made inside follows the inputs' device, not torch's default one (a trainer may set
    its default to cuda and hand over cpu rewards, or the reverse). The meta device stands in for the
    other device on a CPU machine: a tensor made there holds no data, so index_add or int() fails, or isin
    answers garbage."""
    rewards = torch.tensor([0.1, 0.9, 0.3, 0.5, 0.5, 0.4, 0.8])
    groups = torch.tensor([2, 2, 2, 6, 6, 9, 9])
    want = compute_advantages(rewards, groups)
    want_keep = [True, True, True, False, False, True, True]
    with torch.device("meta"):
        res = compute_advantages(rewards, groups)
        keep, n_dropped = drop_zero_variance(res)
        keep_all, none = drop_zero_variance(compute_advantages(rewards[:3], groups[:3]))
    assert res.adv.device.type == "cpu" and torch.equal(res.adv, want.adv)
    assert keep.tolist() == want_keep and n_dropped == 2
    assert keep_all.tolist() == [True] * 3 and none == 0
