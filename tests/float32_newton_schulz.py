"""Muon with its Newton-Schulz in float32, for tests that compare runs whose gradients differ in float32
rounding only (another number of processes, fsdp against one process).

In bf16 (torch's choice) an input that differs in its last float32 bits can round to another bf16 value,
and how far that moves the update depends on the CPU's bf16 matmuls (AMX-BF16 on recent Intel Xeons rounds
differently from AVX-512 or AVX2 code): a tolerance there would hold on one machine and fail on another.
In float32 the compared runs differ by float32 rounding alone, on any CPU.

    python tests/float32_newton_schulz.py ARGS     # tests/torchrun_worker.py ARGS, Newton-Schulz in float32
"""

import contextlib
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.optim._muon as torch_muon  # noqa: E402

from gpt2_pretrain import muon  # noqa: E402


def newton_schulz_float32(grad, ns_coefficients, ns_steps, eps, *use_addmm):
    """torch.optim._muon._zeropower_via_newtonschulz's iteration, in float32."""
    a, b, c = ns_coefficients
    ortho = grad.float()
    if grad.size(0) > grad.size(1):
        ortho = ortho.T
    ortho = ortho / ortho.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = ortho @ ortho.T
        ortho = torch.addmm(ortho, torch.addmm(gram, gram, gram, beta=b, alpha=c), ortho, beta=a)
    return ortho.T if grad.size(0) > grad.size(1) else ortho


@contextlib.contextmanager
def float32_newton_schulz():
    """torch.optim.Muon and muon.ShardedMuon (its rows moved in float32 too) orthogonalize in float32."""
    saved = torch_muon._zeropower_via_newtonschulz, muon._zeropower_via_newtonschulz, muon.NEWTON_SCHULZ_DTYPE
    torch_muon._zeropower_via_newtonschulz = muon._zeropower_via_newtonschulz = newton_schulz_float32
    muon.NEWTON_SCHULZ_DTYPE = torch.float32
    try:
        yield
    finally:
        (torch_muon._zeropower_via_newtonschulz, muon._zeropower_via_newtonschulz,
         muon.NEWTON_SCHULZ_DTYPE) = saved


if __name__ == "__main__":
    sys.argv = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchrun_worker.py"), *sys.argv[1:]]
    with float32_newton_schulz():
        runpy.run_path(sys.argv[0], run_name="__main__")
