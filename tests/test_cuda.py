"""GPU-only checks: they skip themselves without CUDA. Run them on a GPU machine with `make test`.

bf16 autocast training, fused AdamW on the GPU, resume on the GPU (within the usual non-determinism), and a
one-GPU torchrun run on NCCL.
"""

import math
import os
import signal
import sys

import pytest
import torch

import train
from configure_optimizers import configure_adamw
from model import GPT, GPTConfig
from tests.conftest import read_metrics, run_python, tiny_args
from tests.test_resume import DELAY, finish, start, wait_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_args(token_dir, out_dir, *extra):
    return [arg for arg in tiny_args(token_dir, out_dir, *extra) if arg != "--device=cpu"] + ["--device=cuda"]


def test_bf16_training_on_the_gpu_learns_and_reports_mfu(token_dir, tmp_path):
    out = str(tmp_path / "run")
    train.main(cuda_args(token_dir, out, "--max_steps=30", "--eval_interval=30", "--learning_rate=3e-3"))
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    name = torch.cuda.get_device_name()
    if any(gpu in name for gpu in ("A100", "H100", "H200")):  # a GPU in the peak table: MFU is a number
        assert all(m["mfu"] is not None and m["mfu"] > 0 for m in read_metrics(out) if "loss" in m)


def test_adamw_is_fused_on_the_gpu():
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16)).cuda()
    optimizer = configure_adamw(model, 0.1, 1e-3, device_type="cuda", log=lambda *args: None)
    assert optimizer.defaults["fused"] is True
    model(torch.randint(0, 64, (2, 16), device="cuda"), torch.randint(0, 64, (2, 16), device="cuda"))[1].backward()
    optimizer.step()


def test_gpu_resume_continues_close_to_the_uninterrupted_run(token_dir, tmp_path):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    args = ["--max_steps=8", "--checkpoint_interval=3"]
    train.main(cuda_args(token_dir, whole, *args))
    command = [sys.executable, "train.py", *cuda_args(token_dir, split, *args)]
    process = start(command, env=DELAY)
    wait_for(lambda: os.path.isfile(os.path.join(split, "ckpt_000003.pt")), process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    code, output = finish(start(command))
    assert code == 0, output
    expected = [(m["step"], m["loss"]) for m in read_metrics(whole) if "loss" in m]
    resumed = [(m["step"], m["loss"]) for m in read_metrics(split) if "loss" in m]
    assert [step for step, _ in resumed] == [step for step, _ in expected]
    for (_, a), (_, b) in zip(expected, resumed):
        assert a == pytest.approx(b, rel=1e-3)  # cuda kernels are not bitwise deterministic


def test_one_gpu_torchrun_uses_nccl(token_dir, tmp_path):
    out = str(tmp_path / "run")
    result = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
                         *cuda_args(token_dir, out, "--max_steps=3")], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "device: cuda:0 | world size: 1" in result.stdout
    assert os.path.isfile(os.path.join(out, "ckpt_000003.pt"))
