"""The chunked lm_head + cross-entropy against F.cross_entropy on the full logits."""

import pytest
import torch
import torch.nn.functional as F

from gpt2_pretrain import fused_loss
from gpt2_pretrain.fused_loss import linear_cross_entropy
from model import GPT, GPTConfig


def reference(x, weight, targets):
    return F.cross_entropy((x @ weight.t()).float(), targets, ignore_index=-1)


@pytest.mark.parametrize("rows, channels, vocab, chunk_elements", [
    (300, 32, 1000, 2**12),  # many chunks, the last one short
    (64, 16, 50304, 2**22),  # GPT-2's padded vocabulary
    (5, 8, 17, 2**22),  # one chunk
])
def test_loss_and_gradients_match_full_logits(monkeypatch, rows, channels, vocab, chunk_elements):
    monkeypatch.setattr(fused_loss, "CPU_CHUNK_ELEMENTS", chunk_elements)
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, channels, generator=generator, requires_grad=True)
    weight = (0.3 * torch.randn(vocab, channels, generator=generator)).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[::7] = -1  # ignored rows: no loss, no gradient
    expected = reference(x, weight, targets)
    expected_grads = torch.autograd.grad(3 * expected, (x, weight))
    loss = linear_cross_entropy(x, weight, targets)
    grads = torch.autograd.grad(3 * loss, (x, weight))  # a scaled loss, as grad accumulation does
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert grads[0][::7].abs().max() == 0


def test_all_rows_ignored_gives_nan_like_cross_entropy():
    x, weight = torch.randn(4, 8), torch.randn(10, 8)
    targets = torch.full((4,), -1)
    assert torch.isnan(linear_cross_entropy(x, weight, targets)) and torch.isnan(reference(x, weight, targets))


@pytest.mark.parametrize("tied", [True, False])
def test_model_loss_and_gradients_match_the_plain_loss(monkeypatch, tied):
    """The whole GPT, tied and untied heads: the same loss and parameter gradients as full logits."""
    monkeypatch.setattr(fused_loss, "CPU_CHUNK_ELEMENTS", 2**11)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=96, n_layer=2, n_head=2, n_embd=16, tie_embeddings=tied))
    idx, targets = torch.randint(0, 96, (3, 16)), torch.randint(0, 96, (3, 16))
    targets[0, :5] = -1
    _, loss = model(idx, targets)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    logits, none = model(idx)
    assert none is None and logits.shape == (3, 16, 96)
    expected = F.cross_entropy(logits.view(-1, 96), targets.view(-1), ignore_index=-1)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_model_gives_the_same_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    _, eager = model(idx, targets)
    _, compiled = torch.compile(model)(idx, targets)
    torch.testing.assert_close(compiled, eager)


def test_no_grad_computes_the_loss_only():
    """Under no_grad (evaluation) the loss costs the logits' matmul alone: no gradient of x or of the
    lm_head weight, a Parameter, is built. Counted by torch's FlopCounterMode, not by our own arithmetic."""
    from torch.utils.flop_counter import FlopCounterMode

    generator = torch.Generator().manual_seed(0)
    rows, channels, vocab = 64, 16, 300
    x = torch.randn(rows, channels, generator=generator, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(vocab, channels, generator=generator))
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[::5] = -1
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        loss = linear_cross_entropy(x, weight, targets)
    assert counter.get_total_flops() == 2 * rows * channels * vocab  # the logits, nothing else
    torch.testing.assert_close(loss, reference(x, weight, targets).detach(), rtol=1e-5, atol=1e-6)
