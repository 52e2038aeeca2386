"""grpo.refine rules on hand-made reward tables."""
import pytest
import torch

from grpo.refine import improved, rectify_false_positives, should_skip_step


def test_rectification_on_a_hand_table():
    stage1 = torch.tensor([0.62, 0.40, 0.55])  # the initial image is the lowest: 0.40
    refined = torch.tensor([0.70, 0.40, 0.35, 0.41, 0.10])
    rewards, n = rectify_false_positives(refined, 0.40, stage1)
    assert torch.allclose(rewards, torch.tensor([0.70, 0.40, 0.40, 0.41, 0.40]))
    assert n == 3  # equal-to-initial counts as not improved


def test_rectification_uses_stage1_minimum_not_initial_reward():
    rewards, n = rectify_false_positives(torch.tensor([0.5, 0.8]), 0.6, torch.tensor([0.6, 0.3]))
    assert torch.allclose(rewards, torch.tensor([0.3, 0.8])) and n == 1


def test_rewards_keep_the_refined_dtype():
    """The floor is cast to the refined rewards' dtype: fp64 stage-1 rewards do not promote the result."""
    refined = torch.tensor([0.9, 0.2], dtype=torch.float32)
    rewards, n = rectify_false_positives(refined, 0.5, torch.tensor([0.5, 0.25], dtype=torch.float64))
    assert rewards.dtype == torch.float32 and rewards.tolist() == [refined[0].item(), 0.25] and n == 1


def test_all_improved_changes_nothing():
    refined = torch.tensor([0.9, 0.8])
    rewards, n = rectify_false_positives(refined, 0.5, torch.tensor([0.5, 0.7]))
    assert torch.equal(rewards, refined) and n == 0


def test_skip_rule_per_batch():
    table = {  # prompt -> (initial reward, refinement rewards)
        "a": (0.3, torch.tensor([0.2, 0.3])),
        "b": (0.5, torch.tensor([0.5, 0.4])),
    }
    flags = [bool(improved(r, init).any()) for init, r in table.values()]
    assert flags == [False, False] and should_skip_step(flags)
    table["c"] = (0.1, torch.tensor([0.1, 0.15]))
    flags = [bool(improved(r, init).any()) for init, r in table.values()]
    assert not should_skip_step(flags)


def test_bad_inputs():
    with pytest.raises(ValueError, match="stage1_rewards"):
        rectify_false_positives(torch.ones(2), 0.5, torch.ones(0))
    with pytest.raises(ValueError, match="refined_rewards"):
        rectify_false_positives(torch.ones(2, 1), 0.5, torch.ones(2))
    with pytest.raises(ValueError, match="initial_reward"):
        rectify_false_positives(torch.ones(2), float("nan"), torch.ones(2))
    with pytest.raises(ValueError, match="^improved_any_per_group must not be empty$"):
        should_skip_step([])
