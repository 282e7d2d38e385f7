"""token_logprobs, masked_mean and masked_whiten against hand-computed values."""

import math

import pytest
import torch

from lightning_rlhf.losses.tokens import IGNORE_INDEX, masked_mean, masked_whiten, token_logprobs


def test_token_logprobs_hand_computed():
    """logits (ln 1, ln 2, ln 3) give softmax (1/6, 2/6, 3/6), so token 2 -> ln(1/2), token 0 -> ln(1/6).

    The second position's logits are shifted by +5, which must not change the answer (softmax invariance).
    """
    row = torch.tensor([0.0, math.log(2), math.log(3)])
    logits = torch.stack([row, row + 5])[None]  # (1, 2, 3)
    tokens = torch.tensor([[2, 0]])
    expected = torch.tensor([[math.log(1 / 2), math.log(1 / 6)]])
    torch.testing.assert_close(token_logprobs(logits, tokens), expected)


def test_token_logprobs_does_not_shift():
    """logits[:, t] scores tokens[:, t]: a one-hot logit at t makes token t likely at t, not at t + 1."""
    logits = torch.full((1, 3, 4), -20.0)
    tokens = torch.tensor([[1, 3, 2]])
    logits[0, torch.arange(3), tokens[0]] = 20.0
    assert torch.all(token_logprobs(logits, tokens) > -1e-6)
    assert torch.all(token_logprobs(logits, tokens.roll(1, dims=1)) < -30)


def test_token_logprobs_gives_zero_at_ignored_positions():
    logits = torch.randn(2, 3, 5)
    tokens = torch.tensor([[1, IGNORE_INDEX, 4], [IGNORE_INDEX, 0, 2]])
    out = token_logprobs(logits, tokens)
    assert out[0, 1] == 0 and out[1, 0] == 0
    torch.testing.assert_close(out[0, 0], torch.log_softmax(logits[0, 0], -1)[1])


def test_token_logprobs_at_a_temperature_hand_computed():
    """logits (0, ln 4) at T = 2 are (0, ln 2): softmax (1/3, 2/3), so token 1 -> ln(2/3), token 0 -> ln(1/3)."""
    logits = torch.tensor([[[0.0, math.log(4)], [0.0, math.log(4)]]])
    out = token_logprobs(logits, torch.tensor([[1, 0]]), temperature=2.0)
    torch.testing.assert_close(out, torch.tensor([[math.log(2 / 3), math.log(1 / 3)]]))


@pytest.mark.parametrize(("chunk_rows", "temperature"), [(1, 1.0), (3, 1.0), (1024, 1.0), (3, 0.7), (1024, 1.6)])
def test_token_logprobs_matches_log_softmax_and_its_gradient(chunk_rows, temperature):
    """Forward and backward equal the full float64 log_softmax of logits / T, whatever the chunking (10 rows,
    chunks of 3) and the temperature (the gradient carries the 1/T of the chain rule)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float32, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 5))
    weights = torch.randn(2, 5)
    ours = token_logprobs(logits, tokens, chunk_rows=chunk_rows, temperature=temperature)
    (ours * weights).sum().backward()
    ours_grad = logits.grad.clone()
    logits.grad = None
    reference = torch.log_softmax(logits.double() / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)
    (reference * weights.double()).sum().backward()
    torch.testing.assert_close(ours.double(), reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_grad.double(), logits.grad.double(), rtol=0, atol=1e-6)


def test_token_logprobs_is_float32_accurate_for_bf16_logits():
    """For bf16 logits the answer is the float32 log-softmax of those bf16 values, not a bf16-rounded one."""
    torch.manual_seed(0)
    logits = (torch.randn(3, 4, 1000) * 4).to(torch.bfloat16)
    tokens = torch.randint(0, 1000, (3, 4))
    out = token_logprobs(logits, tokens)
    exact = torch.log_softmax(logits.double(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-5)
    # bf16 arithmetic would be off by about 1e-2 here; make sure the test could tell the difference.
    bf16_native = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert (bf16_native.double() - exact).abs().max() > 1e-3


def test_masked_mean_hand_computed():
    """values [[1,2,3],[4,5,6]], mask [[1,1,0],[1,0,0]]: all -> (1+2+4)/3 = 7/3; per row -> [1.5, 4]."""
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(masked_mean(values, mask), torch.tensor(7 / 3))
    torch.testing.assert_close(masked_mean(values, mask, dim=1), torch.tensor([1.5, 4.0]))
    assert masked_mean(values, torch.zeros_like(mask)) == 0


def test_masked_whiten_hand_computed():
    """[1, 2, 3 | 100 masked]: mean 2, unbiased var ((-1)² + 0 + 1²) / 2 = 1 -> [-1, 0, 1, 0];
    without shifting the mean back out -> [1, 2, 3, 0]. The masked 100 must not leak into the statistics."""
    values = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0], dtype=torch.bool)
    torch.testing.assert_close(masked_whiten(values, mask), torch.tensor([-1.0, 0.0, 1.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        masked_whiten(values, mask, shift_mean=False), torch.tensor([1.0, 2.0, 3.0, 0.0]), atol=1e-6, rtol=0
    )


def test_token_logprobs_gradient_for_bf16_logits():
    """The bf16 gradient is the float64 gradient of the bf16 logits, rounded once to bf16 (no bf16 arithmetic)."""
    torch.manual_seed(0)
    logits = (torch.randn(2, 3, 50) * 3).to(torch.bfloat16).requires_grad_(True)
    tokens = torch.randint(0, 50, (2, 3))
    token_logprobs(logits, tokens, chunk_rows=4).sum().backward()
    reference = logits.detach().double().requires_grad_(True)
    torch.log_softmax(reference, -1).gather(-1, tokens[..., None]).sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad, reference.grad.to(torch.bfloat16), rtol=0, atol=0)
