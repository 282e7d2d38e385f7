"""Optimiser helpers: each parameter group clipped on its own, parameter groups with their own learning rate."""

import math

import torch

from lightning_rlhf.training.optim import clip_grad_norms


def test_each_parameter_group_is_clipped_to_its_own_norm():
    """Policy gradient (3, 0) has norm 3, value gradient (0, 40) norm 40; max_norm 1.

    Clipped apart, each group is scaled to norm 1: the policy by 1/3 to (1, 0), the value by 1/40 to (0, 1). One
    global norm, sqrt(3² + 40²) = 40.11, would have shrunk the policy to 3/40.11 = 0.075: that is the bug this
    pins. The norms returned are the ones before clipping."""
    policy, value = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    policy.grad, value.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 40.0])
    optimizer = torch.optim.SGD([{"params": [policy]}, {"params": [value], "lr": 0.5}], lr=0.1)
    norms = clip_grad_norms(optimizer, 1.0)
    assert [round(float(n), 4) for n in norms] == [3.0, 40.0]
    torch.testing.assert_close(policy.grad, torch.tensor([1.0, 0.0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(value.grad, torch.tensor([0.0, 1.0]), rtol=1e-5, atol=1e-6)


def test_no_max_norm_measures_without_clipping():
    """``None``: norms are still reported (sqrt(1² + 2² + 2²) = 3), gradients untouched."""
    weight = torch.nn.Parameter(torch.zeros(3))
    weight.grad = torch.tensor([1.0, 2.0, 2.0])
    (norm,) = clip_grad_norms(torch.optim.SGD([weight], lr=0.1), None)
    assert math.isclose(float(norm), 3.0, rel_tol=1e-6)
    assert torch.equal(weight.grad, torch.tensor([1.0, 2.0, 2.0]))
