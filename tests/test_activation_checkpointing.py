"""Activation checkpointing (gpt2_pretrain/activation_checkpointing.py): the same training with less kept.

References: a run without checkpointing (losses, val losses, weights), and the bytes autograd saves for the
backward as torch.autograd.graph.saved_tensors_hooks sees them, against the --dry_run estimate.
"""

import os

import torch

import train
from gpt2_pretrain.activation_checkpointing import apply_activation_checkpointing, checkpointed_blocks
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
