"""Activation checkpointing (gpt2_pretrain/activation_checkpointing.py): the same training with less kept.

References: a run without checkpointing (losses, val losses, weights), and the bytes autograd saves for the
backward as torch.autograd.graph.saved_tensors_hooks sees them, against the --dry_run estimate.
"""

import os

import pytest
import torch

import train
from gpt2_pretrain.activation_checkpointing import apply_activation_checkpointing, checkpointed_blocks
from gpt2_pretrain.dry_run import activation_bytes, memory_estimate
from tests.conftest import read_metrics, tiny_args

# 3 blocks: selective (every 2nd) checkpoints blocks 0 and 2 and leaves block 1 as it is; 2 micro-steps a step
AC_ARGS = ["--n_layer=3", "--max_steps=10", "--eval_interval=5", "--checkpoint_interval=5", "--keep_last=0"]


def losses(out_dir):
    return [(m["step"], m.get("loss"), m.get("val_loss"), m.get("grad_norm")) for m in read_metrics(out_dir)]


def final_weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt_000010.pt"), weights_only=True)["model"]


def test_checkpointed_blocks():
    assert checkpointed_blocks(4, "none", 2) == []
    assert checkpointed_blocks(4, "full", 2) == [0, 1, 2, 3]
    assert checkpointed_blocks(5, "selective", 2) == [0, 2, 4]
    assert checkpointed_blocks(5, "selective", 3) == [0, 3]


def test_training_and_resume_are_unchanged_by_activation_checkpointing(token_dir, tmp_path):
    """10 steps of 2 micro-steps (accumulation, the chunked loss) with full and selective checkpointing log
    the losses, val losses and gradient norms of a run without it, and end on its weights, bit for bit:
    the recompute runs the same float32 ops on the same inputs in the same order on one CPU, so nothing
    may differ at all. A run resumed with checkpointing from the run without it also ends there: the
    state_dict keys are unchanged, so the checkpoint loads as it is."""
    runs = {}
    for mode in ("none", "full", "selective"):
        out = str(tmp_path / mode)
        assert train.main(tiny_args(token_dir, out, *AC_ARGS, f"--activation_checkpointing={mode}")) == 0
        runs[mode] = out
    reference = losses(runs["none"])
    assert len([r for r in reference if r[1] is not None]) == 10
    for mode in ("full", "selective"):
        assert losses(runs[mode]) == reference, mode
        weights, expected = final_weights(runs[mode]), final_weights(runs["none"])
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[key], expected[key]) for key in expected), mode

    resumed = str(tmp_path / "resumed")
    assert train.main(tiny_args(token_dir, resumed, *AC_ARGS, "--activation_checkpointing=full",
                                f"--resume={os.path.join(runs['none'], 'ckpt_000005.pt')}")) == 0
    assert [r for r in losses(resumed) if r[0] > 5] == [r for r in reference if r[0] > 5]
    weights, expected = final_weights(resumed), final_weights(runs["none"])
    assert all(torch.equal(weights[key], expected[key]) for key in expected)


def saved_bytes(model, x, y):
    """Bytes autograd saves for the backward of one micro-step, each storage once (q, k and v are views
    of one c_attn output), the weights left out: what the step holds between its forward and backward."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _, loss = model(x, y)
    loss.backward()  # the checkpointed blocks' saved inputs are used, not just held
    return sum(storages.values())


def test_saved_activation_bytes_fall_as_the_dry_run_estimate_says(token_dir, tmp_path):
    """The --dry_run activation figure (float32, as on a CPU) for none, full and selective against the bytes
    saved_tensors_hooks sees in one micro-step of the model, loss included (the chunked loss keeps x's and
    lm_head's float32 gradients and a scalar: in the estimate's loss term). Within 1%: the estimate counts
    each tensor model.py's ops keep, and matches torch 2.11 and 2.13's CPU kernels to the byte; 1% leaves
    room for another CPU attention kernel's per-row statistics, never for a missed (B, T, C) tensor (6% of a
    block's bytes at this width)."""
    measured = {}
    for mode in ("none", "full", "selective"):
        config = train.load_config(tiny_args(token_dir, str(tmp_path), "--n_layer=3",
                                             f"--activation_checkpointing={mode}"))
        torch.manual_seed(0)
        model = train.GPT(train.model_config(config))
        apply_activation_checkpointing(model.transformer.h, mode, config.ac_every)
        x = torch.randint(0, config.vocab_size, (config.batch_size, config.block_size))
        measured[mode] = saved_bytes(model, x, torch.roll(x, -1, dims=1))
        kept, recompute = activation_bytes(config, bf16=False)
        loss_keeps = 4 * x.numel() * config.n_embd + 4 * config.vocab_size * config.n_embd + 4
        assert abs(measured[mode] - (kept + loss_keeps)) <= 0.01 * measured[mode], (mode, measured[mode], kept)
        assert memory_estimate(config, model.num_params(), bf16=False, device_type="cpu")["activations"] == kept
        assert (recompute > 0) == (mode != "none")
    # each checkpointed block frees all it kept but its input: 2 of 3 blocks' worth under selective
    assert measured["full"] < measured["selective"] < measured["none"]
    block_minus_input = (measured["none"] - measured["full"]) / 3
    assert abs(measured["none"] - measured["selective"] - 2 * block_minus_input) <= 0.01 * measured["none"]


@pytest.mark.slow  # torch.compile: about 3 s on the 2-core box
def test_compiled_checkpointed_blocks_keep_the_checkpoint_and_the_gradients(monkeypatch):
    """torch.compile traces the checkpointed blocks in one graph (fullgraph: no break at the instance
    forward), keeps them as regions to recompute, and gives the loss and gradients of the uncompiled model
    without checkpointing, bit for bit: aot_eager runs the same aten ops eagerly, in float32 on one CPU."""
    # imported here: dynamo costs a second to import
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from gpt2_pretrain import fused_loss

    # the loss op compiles its per-chunk softmax with inductor inside a compiled model (its own test is
    # test_fused_loss's); here it runs eagerly, so that what differs from the uncompiled model is the blocks
    monkeypatch.setattr(fused_loss, "chunk_loss_and_grad",
                        lambda logits, targets, softcap, compiled: fused_loss._chunk_loss_and_grad(logits, targets,
                                                                                                    softcap))

    def run(model, x):
        _, loss = model(x, torch.roll(x, -1, dims=1))
        loss.backward()
        return [loss.detach()] + [p.grad for p in model.parameters()]

    graphs = []

    def eager(graph_module, _):
        return make_boxed_func(graph_module.forward)

    def recording(graph_module, example_inputs):
        graphs.append(graph_module.code)
        return aot_autograd(fw_compiler=eager, bw_compiler=eager)(graph_module, example_inputs)

    x = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    results = []
    for mode in ("none", "selective"):
        torch.manual_seed(0)
        model = train.GPT(train.GPTConfig(block_size=32, vocab_size=128, n_layer=3, n_head=2, n_embd=32))
        apply_activation_checkpointing(model.transformer.h, mode, 2)
        results.append(run(torch.compile(model, backend=recording, fullgraph=True) if mode != "none" else model, x))
    assert len(graphs) == 1 and graphs[0].count("higher_order.tag_activation_checkpoint(") == 2  # blocks 0, 2
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
