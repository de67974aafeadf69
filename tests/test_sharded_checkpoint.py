"""Sharded (--parallel=fsdp) checkpoints: SIGKILL and resume exactly, resume at another world size, export.

One test, since each torchrun start is the slow part: the reference is an uninterrupted 2-process run,
and for the export transformers' GPT2LMHeadModel with its weights.
"""

import math
import os
import shutil
import signal
import sys

import pytest
import torch

from gpt2_pretrain.checkpoint.files import load_checkpoint, model_weights
from model import GPT, GPTConfig
from tests.conftest import DELAY, FULL_VOCAB, curve, finish, run_python, start, tiny_args, wait_for, workers

pytestmark = pytest.mark.slow  # every test here starts torchrun or several processes

# the GPT-2 vocab: the checkpoint is exported to transformers with GPT-2's 50257 tokens
ARGS = ["--max_steps=8", "--checkpoint_interval=3", "--eval_interval=4", "--keep_last=0", "--parallel=fsdp", FULL_VOCAB]


def command(out_dir, token_dir, nproc, script="train.py"):
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return launcher + [script, *tiny_args(token_dir, out_dir, *ARGS)]


def run(out_dir, token_dir, nproc, script="train.py"):
    code, output = finish(start(command(out_dir, token_dir, nproc, script)), timeout=240)
    assert code == 0, output
    return output


def losses_close(run_curve, reference_curve, first_step):
    """The losses from first_step on agree within float32 reduction-order noise."""
    losses = [(s, loss) for s, loss in run_curve[0] if s >= first_step]
    expected = [(s, loss) for s, loss in reference_curve[0] if s >= first_step]
    assert [s for s, _ in losses] == [s for s, _ in expected]
    assert all(math.isclose(a, b, rel_tol=1e-4) for (_, a), (_, b) in zip(losses, expected)), (losses, expected)


def test_sharded_checkpoints_resume_exactly_across_world_sizes_and_export(token_dir, tmp_path):
    reference, out = str(tmp_path / "reference"), str(tmp_path / "interrupted")
    run(reference, token_dir, 2, "tests/torchrun_worker.py")
    assert sorted(n for n in os.listdir(reference) if n.startswith("ckpt_")) == [f"ckpt_{s:06d}.dcp" for s in (3, 6, 8)]

    # node failure: SIGKILL to both ranks and torchrun once the first checkpoint exists, then --resume=auto
    process = start(command(out, token_dir, 2), env=DELAY)
    wait_for(lambda: os.path.exists(os.path.join(out, "ckpt_000003.dcp")), process)
    for pid in [*workers(process.pid).values(), process.pid]:
        os.kill(pid, signal.SIGKILL)
    finish(process)
    output = run(out, token_dir, 2)
    assert "ckpt_000003.dcp at step 3" in output
    assert curve(out) == curve(reference)
    final = model_weights(os.path.join(out, "ckpt_000008.dcp"), load_checkpoint(os.path.join(out, "ckpt_000008.dcp")))
    for name, tensor in torch.load(os.path.join(reference, "rank0.pt"), weights_only=True).items():
        assert torch.equal(final[name], tensor), name

    # a sharded checkpoint exports to a transformers folder whose logits are the trained model's
    transformers = pytest.importorskip("transformers")
    result = run_python(["scripts/export_hf.py", os.path.join(reference, "ckpt_000008.dcp"), str(tmp_path / "hf")])
    assert result.returncode == 0, result.stderr
    ours = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    ours.load_state_dict(torch.load(os.path.join(reference, "rank0.pt"), weights_only=True))
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        assert (ours(idx)[0][..., :50257] - hf(idx).logits).abs().max().item() < 1e-4

    # 2 -> 1: the 2-process checkpoint at step 3 goes on in one process (no torchrun) with the same losses;
    # 1 -> 2: that run's own checkpoint at step 6 goes on in two processes
    for checkpoint, nproc, name in ((os.path.join(out, "ckpt_000003.dcp"), 1, "two_to_one"),
                                    (str(tmp_path / "two_to_one" / "ckpt_000006.dcp"), 2, "one_to_two")):
        resumed = str(tmp_path / name)
        shutil.copytree(checkpoint, os.path.join(resumed, os.path.basename(checkpoint)))
        output = run(resumed, token_dir, nproc)
        step = load_checkpoint(checkpoint)["step"]
        assert f"world size {3 - nproc} -> {nproc}" in output and f"at step {step}" in output
        losses_close(curve(resumed), curve(reference), step)
    result = run_python(["scripts/sample.py", str(tmp_path / "one_to_two"), "--tokens=4"])
    assert result.returncode == 0 and "ckpt_000008.dcp" in result.stderr, result.stderr
