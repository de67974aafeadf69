"""The chunked lm_head + cross-entropy against F.cross_entropy on the full logits."""

import pytest
import torch
import torch.nn.functional as F

from gpt2_pretrain import fused_loss
from gpt2_pretrain.fused_loss import linear_cross_entropy
from model import GPT, GPTConfig


def reference(x, weight, targets, softcap=0.0):
    logits = (x @ weight.t()).float()
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, ignore_index=-1)


@pytest.mark.parametrize("rows, channels, vocab, chunk_elements, softcap", [
    (300, 32, 1000, 2**12, 0.0),  # many chunks, the last one short
    (300, 32, 1000, 2**12, 2.0),  # capped logits: logits of std 1.7 (0.3 * sqrt(32)), well into tanh's bend
    (64, 16, 50304, 2**22, 0.0),  # GPT-2's padded vocabulary
    (5, 8, 17, 2**22, 0.0),  # one chunk
])
def test_loss_and_gradients_match_full_logits(monkeypatch, rows, channels, vocab, chunk_elements, softcap):
    monkeypatch.setattr(fused_loss, "CPU_CHUNK_ELEMENTS", chunk_elements)
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, channels, generator=generator, requires_grad=True)
    weight = (0.3 * torch.randn(vocab, channels, generator=generator)).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[::7] = -1  # ignored rows: no loss, no gradient
    expected = reference(x, weight, targets, softcap)
    expected_grads = torch.autograd.grad(3 * expected, (x, weight))
    loss = linear_cross_entropy(x, weight, targets, softcap=softcap)
    grads = torch.autograd.grad(3 * loss, (x, weight))  # a scaled loss, as grad accumulation does
    # float32 throughout; only the order of the sums differs (per chunk here, one reduction there)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert grads[0][::7].abs().max() == 0
    with torch.no_grad():  # evaluation: the loss alone, by another path (F.cross_entropy per chunk)
        torch.testing.assert_close(linear_cross_entropy(x, weight, targets, softcap=softcap), expected.detach(),
                                   rtol=1e-5, atol=1e-6)


def test_all_rows_ignored_gives_nan_like_cross_entropy():
    x, weight = torch.randn(4, 8), torch.randn(10, 8)
    targets = torch.full((4,), -1)
    assert torch.isnan(linear_cross_entropy(x, weight, targets)) and torch.isnan(reference(x, weight, targets))


def test_bf16_autocast_matches_the_plain_loss_under_autocast():
    """Under CPU autocast the logits' matmuls run in bfloat16 as lm_head's would; loss and gradients stay
    float32, the dtypes of x and the weight."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 32, generator=generator, requires_grad=True)
    weight = (0.3 * torch.randn(500, 32, generator=generator)).requires_grad_()
    targets = torch.randint(0, 500, (200,), generator=generator)
    targets[::5] = -1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(x, weight, targets)
        loss = linear_cross_entropy(x, weight, targets)
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, (x, weight))
    expected_grads = torch.autograd.grad(expected, (x, weight))
    # bfloat16 logits (8 bits of mantissa: 2**-8 relative) on both sides, added up in another order
    torch.testing.assert_close(loss, expected, rtol=4e-3, atol=0)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == torch.float32
        assert ((got - want).norm() / want.norm()).item() < 1e-2  # bf16 matmuls either way


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
def test_compiled_model_calls_the_loss_as_one_op(monkeypatch):
    """torch.compile(fullgraph=True) of the whole GPT: one graph, the chunk loop in it as one call of the
    custom op (its per-chunk softmax compiled apart), and the lm_head weight's gradient kept between forward
    and backward as one float32 (V, C) tensor, not a partial per chunk. Loss and gradients as eager."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    monkeypatch.setattr(fused_loss, "CPU_CHUNK_ELEMENTS", 2**10)  # 8 rows of 96 a chunk: 8 chunks
    torch.manual_seed(0)
    V, C = 96, 16  # no other weight of shape (V, C): c_fc is (4 * C, C)
    model = GPT(GPTConfig(block_size=16, vocab_size=V, n_layer=1, n_head=2, n_embd=C))
    idx, targets = torch.randint(0, V, (4, 16)), torch.randint(0, V, (4, 16))
    targets[0, :5] = -1
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 logits: the dtype of the per-chunk gradients
        _, eager = model(idx, targets)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))

    forward_graphs = []

    def record(graph, example_inputs):
        forward_graphs.append(graph)
        return make_boxed_func(graph.forward)

    def run(graph, example_inputs):
        return make_boxed_func(graph.forward)

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=record, bw_compiler=run)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, compiled = torch.compile(model, backend=backend, fullgraph=True)(idx, targets)
    compiled_grads = torch.autograd.grad(compiled, list(model.parameters()))
    # the same bf16 matmuls; the per-chunk gradient rounded to bf16 once either way, from float32 softmaxes
    # computed in another order of operations (compiled softmax - one-hot, eager exp_ then scatter_add_),
    # so one bf16 rounding step apart at most
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-5)

    assert len(forward_graphs) == 1
    graph = forward_graphs[0].graph
    targets_called = [node.target for node in graph.nodes if node.op == "call_function"]
    assert targets_called.count(torch.ops.gpt2_pretrain.linear_cross_entropy.default) == 1
    assert torch.ops.aten._log_softmax.default not in targets_called  # the loss is not traced into the graph
    saved = [node.meta["val"] for node in graph.find_nodes(op="output")[0].args[0]
             if isinstance(node, torch.fx.Node) and isinstance(node.meta.get("val"), torch.Tensor)]
    assert [tensor.dtype for tensor in saved if tensor.shape == (V, C)] == [torch.float32]


def test_flops_of_the_loss_are_counted():
    """Under no_grad (evaluation) the loss costs the logits' matmul alone: no gradient of x or of the
    lm_head weight, a Parameter, is built; with gradients, a matmul of the same size for each. Counted by
    torch's FlopCounterMode (the op's formula, checked against the plain matmuls), not by hand."""
    from torch.utils.flop_counter import FlopCounterMode

    generator = torch.Generator().manual_seed(0)
    rows, channels, vocab = 64, 16, 300
    x = torch.randn(rows, channels, generator=generator, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(vocab, channels, generator=generator))
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[::5] = -1
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        loss = linear_cross_entropy(x, weight, targets)
    with FlopCounterMode(display=False) as plain:
        reference(x, weight, targets).backward()
    assert counter.get_total_flops() == 2 * rows * channels * vocab  # the logits, nothing else
    torch.testing.assert_close(loss, reference(x, weight, targets).detach(), rtol=1e-5, atol=1e-6)
    with FlopCounterMode(display=False) as counter:
        linear_cross_entropy(x, weight, targets).backward()
    assert counter.get_total_flops() == plain.get_total_flops() == 3 * 2 * rows * channels * vocab
