"""The Muon + AdamW hybrid: grouping, orthogonal updates, momentum warmup, checkpoints, torchrun."""

import io
import math
import os

import pytest
import torch

import train
from configure_optimizers import configure_muon, get_lr, muon_momentum, muon_param_groups
from model import GPT, GPTConfig
from tests.conftest import read_metrics, run_python, tiny_args
from tests.fsdp_worker import check_muon_against_torch


def tiny_model(tie=True):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=128, n_layer=2, n_head=2, n_embd=16, tie_embeddings=tie))


def hybrid(model):
    return configure_muon(model, 16, matrix_lr=0.02, embedding_lr=0.005, unembedding_lr=0.004, scalar_lr=1e-3,
                          log=lambda *a: None)


@pytest.mark.parametrize("tie", [True, False])
def test_each_parameter_in_exactly_one_optimizer(tie):
    model = tiny_model(tie)
    muon, adamw = hybrid(model)
    in_muon = [p for g in muon.param_groups for p in g["params"]]
    in_adamw = [p for g in adamw.param_groups for p in g["params"]]
    ids = [id(p) for p in in_muon + in_adamw]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    assert all(p.dim() == 2 and names[id(p)].startswith("transformer.h.") for p in in_muon)
    assert len(in_muon) == 4 * 2  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert id(model.transformer.wte.weight) in {id(p) for p in in_adamw}
    assert adamw.defaults["betas"] == (0.8, 0.95) and adamw.defaults["eps"] == 1e-10
    assert adamw.defaults["fused"] is True  # one kernel for the AdamW half, as for plain AdamW
    groups = muon_param_groups(model)
    head = groups["unembedding"]
    assert [n for n, _ in head] == (["transformer.wte.weight"] if tie else ["lm_head.weight"])
    lrs = sorted(g["lr"] for g in adamw.param_groups)
    assert math.isclose(max(lrs), 0.005 * (16 / 768) ** -0.5)


def test_muon_update_is_orthogonal_after_shape_adjustment():
    """One Muon step from zero momentum: (W0 - W1) / (lr * sqrt(max(1, rows/cols))) has singular values near 1."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 16))  # tall: rows/cols = 4, so the step is scaled by 2
    optimizer = torch.optim.Muon([weight], lr=0.01, weight_decay=0.0, momentum=0.0, nesterov=False,
                                 adjust_lr_fn="original")
    before = weight.detach().clone()
    weight.grad = torch.randn(64, 16)
    optimizer.step()
    update = (before - weight.detach()) / (0.01 * math.sqrt(64 / 16))
    singular_values = torch.linalg.svdvals(update)
    # in exact arithmetic torch's 5 iterations map this matrix's singular values to 0.686..1.129 (mean 0.89);
    # bf16 rounding (2**-8 relative a product) moves them by a few hundredths: the bounds leave 0.08 and 0.12
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25
    assert abs(singular_values.mean().item() - 1) < 0.2


def test_momentum_warmup():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95)
    assert muon_momentum(10_000) == pytest.approx(0.95)


def test_checkpoint_round_trip_of_both_optimizers():
    """Saved and restored states take the same next step as optimizers that never stopped."""
    idx = torch.randint(0, 128, (2, 16))

    def step(model, optimizers):
        _, loss = model(idx, idx)
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()

    model_a = tiny_model(tie=False)
    optimizers_a = hybrid(model_a)
    step(model_a, optimizers_a)
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "optimizers": [o.state_dict() for o in optimizers_a]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model_b = tiny_model(tie=False)
    model_b.load_state_dict(saved["model"])
    optimizers_b = hybrid(model_b)
    for opt, state in zip(optimizers_b, saved["optimizers"]):
        opt.load_state_dict(state)
    step(model_a, optimizers_a)
    step(model_b, optimizers_b)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


def test_a_skipped_nonfinite_step_leaves_muon_untouched():
    """One process: through guards.apply_update, finite steps equal torch.optim.Muon's bit for bit and a NaN step
    changes no parameter or momentum bit (tests/fsdp_worker.py runs the same check on 2 ranks, ddp and fsdp)."""
    check_muon_against_torch(sharded=False)


def test_quickstart_with_muon_trains(token_dir, tmp_path):
    out = str(tmp_path / "muon")
    train.main(tiny_args(token_dir, out, "--optimizer=muon", "--max_steps=20", "--eval_interval=10"))
    val = [m["val_loss"] for m in read_metrics(out) if "val_loss" in m]
    # 4.87 -> 1.41 measured at tiny_args' vocab of 128 (10.83 -> 2.96 at 50304): room for any CPU's bf16 rounding,
    # none for no training
    assert val[-1] < val[0] - 2.0


@pytest.mark.slow
def test_two_processes_with_muon_match_one_and_each_other(token_dir, tmp_path):
    """DDP with Muon: 2 ranks end with the same weights, and with a 1-process run's (the same global batch).
    Newton-Schulz runs in float32 here (tests/float32_newton_schulz.py says why), so the runs differ by
    float32 rounding alone, on any CPU."""
    outs = {}
    for nproc in (1, 2):
        out = str(tmp_path / f"np{nproc}")
        args = tiny_args(token_dir, out, "--optimizer=muon", "--max_steps=3", "--eval_interval=3")
        result = run_python(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                             "tests/float32_newton_schulz.py", *args], timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        outs[nproc] = out
    reference = torch.load(os.path.join(outs[1], "rank0.pt"), weights_only=True)
    rank0 = torch.load(os.path.join(outs[2], "rank0.pt"), weights_only=True)
    rank1 = torch.load(os.path.join(outs[2], "rank1.pt"), weights_only=True)
    matrices = {name for name, _ in muon_param_groups(tiny_model())["matrix"]}
    scalar_lrs = sum(get_lr(step, 1e-3, 1e-4, 2, 3) for step in range(3))  # tiny_args' schedule, 3 steps
    for name in reference:
        assert torch.equal(rank0[name], rank1[name]), name  # both ranks apply the same averaged gradient
        atol = torch.full_like(reference[name], 1e-6)
        if name in matrices:
            # the gradients differ by float32 reduction order (about 1e-6 of their norm); a Newton-Schulz iteration
            # grows an input error at most 3.4445x (its polynomial's largest slope), so an update (lr 0.02, x2 for
            # tall matrices) moves by under 1e-6 * 3.4445**5 * 0.04 = 2e-5 a step: 1e-4 covers 3 steps and is a
            # 200th of one Muon step; a rank stepping with its own gradient, not the mean, would be a step off
            atol[:] = 1e-4
        elif name.endswith("attn.c_attn.bias"):
            # the key bias has a zero gradient (softmax ignores what adds the same to a query's every score), so
            # AdamW (eps 1e-10) turns its float32 noise into steps of up to lr, in either direction
            atol[atol.numel() // 3: 2 * atol.numel() // 3] = 2 * scalar_lrs
        # the rest (AdamW's): float32 reduction order, as in test_distributed's adamw comparison
        assert ((rank0[name] - reference[name]).abs() <= atol + 1e-4 * reference[name].abs()).all(), name
