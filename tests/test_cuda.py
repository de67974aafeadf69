"""GPU-only checks: they skip themselves without CUDA. Run them on a GPU machine with `make test`.

bf16 autocast training, fused AdamW on the GPU, resume on the GPU (within the usual non-determinism), a
one-GPU torchrun run on NCCL, and --parallel=fsdp on one GPU (bf16 gathered weights) against ddp.
"""

import math
import os
import signal
import sys

import pytest
import torch

import train
from configure_optimizers import configure_adamw
from data.loader import DataLoader
from model import GPT, GPTConfig
from tests.conftest import DELAY, FULL_VOCAB, finish, read_metrics, run_python, start, tiny_args, wait_for

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def cuda_args(token_dir, out_dir, *extra):
    # the GPT-2 vocab, the one these tests' tolerances (bf16 against fp32 losses) were set on; on a GPU it costs
    # little, and these tests run only where one is present
    return [arg for arg in tiny_args(token_dir, out_dir, *extra) if arg != "--device=cpu"] + ["--device=cuda",
                                                                                              FULL_VOCAB]


def test_bf16_training_on_the_gpu_learns_and_reports_mfu(token_dir, tmp_path):
    out = str(tmp_path / "run")
    train.main(cuda_args(token_dir, out, "--max_steps=30", "--eval_interval=30", "--learning_rate=3e-3"))
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    name = torch.cuda.get_device_name()
    if any(gpu in name for gpu in ("A100", "H100", "H200")):  # a GPU in the peak table: MFU is a number
        assert all(m["mfu"] is not None and m["mfu"] > 0 for m in read_metrics(out) if "loss" in m)


def test_gpu_loader_hands_out_the_cpu_loader_batches(token_dir):
    cpu, gpu = (DataLoader(token_dir, "train", 4, 32, device=device) for device in ("cpu", "cuda"))
    for _ in range(5):
        expected, got = cpu.next_batch(), gpu.next_batch()  # copied on a side stream, read after the wait
        assert got[0].is_cuda and torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])
    cpu.position = gpu.position = 0
    assert torch.equal(gpu.next_batch()[0].cpu(), cpu.next_batch()[0])


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


def test_fused_loss_matches_full_logits_under_bf16_autocast():
    from gpt2_pretrain.fused_loss import linear_cross_entropy

    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8192 + 100, 256, device="cuda", generator=generator, requires_grad=True)
    weight = (0.05 * torch.randn(50304, 256, device="cuda", generator=generator)).requires_grad_()
    targets = torch.randint(0, 50257, (x.size(0),), device="cuda", generator=generator)
    targets[::5] = -1
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = torch.nn.functional.cross_entropy((x @ weight.t()).float(), targets, ignore_index=-1)
        loss = linear_cross_entropy(x, weight, targets)
    expected_grads = torch.autograd.grad(expected, (x, weight))
    grads = torch.autograd.grad(loss, (x, weight))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-3)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == want.dtype == torch.float32
        assert ((got - want).norm() / want.norm()).item() < 1e-2  # bf16 matmuls either way


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_fsdp_on_one_gpu_trains_like_ddp_and_resumes(token_dir, tmp_path, optimizer):
    """--parallel=fsdp on one GPU (bf16 gathered weights, fp32 reduction) against ddp: close losses, and a
    sharded checkpoint written by it resumes."""
    runs = {}
    for parallel in ("ddp", "fsdp"):
        out = str(tmp_path / parallel)
        train.main(cuda_args(token_dir, out, "--max_steps=6", "--eval_interval=6", "--checkpoint_interval=3",
                             f"--parallel={parallel}", f"--optimizer={optimizer}"))
        runs[parallel] = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert all(math.isfinite(loss) for loss in runs["fsdp"])
    assert all(abs(a - b) < 0.05 for a, b in zip(runs["ddp"], runs["fsdp"])), runs  # bf16 weights vs fp32 ones
    assert os.path.isdir(tmp_path / "fsdp" / "ckpt_000006.dcp")
    train.main(cuda_args(token_dir, str(tmp_path / "fsdp"), "--max_steps=8", "--eval_interval=8",
                         "--checkpoint_interval=3", "--parallel=fsdp", f"--optimizer={optimizer}"))
    assert [m["step"] for m in read_metrics(str(tmp_path / "fsdp")) if "loss" in m] == list(range(8))
