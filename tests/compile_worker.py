"""torch.compile under --parallel=fsdp, eager and compiled runs in one torchrun launch (for tests/test_parallel.py).

    torchrun --nproc_per_node=2 tests/compile_worker.py OUT_ROOT BACKEND_AC TRAIN_ARGS...

Trains with TRAIN_ARGS (fsdp, evaluations, a sample and HellaSwag) into OUT_ROOT/eager, then compiled as train.py
compiles (inductor) into OUT_ROOT/compiled, then compiled with --activation_checkpointing=full into
OUT_ROOT/compiled_ac with torch.compile's backend BACKEND_AC (aot_eager: the graphs without inductor's C++
compilation); after each compiled run, compiling.compile_counts() of that run goes to its folder as
compile_counts_rank{R}.json.
"""

import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import train  # noqa: E402
from config import load_config  # noqa: E402
from gpt2_pretrain.compiling import compile_counts, reset_compile_counts  # noqa: E402
from gpt2_pretrain.distributed import setup_distributed, teardown_distributed  # noqa: E402


def main():
    out_root, backend_ac, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    info = setup_distributed("cpu")
    compile_with = torch.compile
    try:
        for run, extra, backend in (("eager", [], None), ("compiled", ["--compile"], "inductor"),
                                    ("compiled_ac", ["--compile", "--activation_checkpointing=full"], backend_ac)):
            out_dir = os.path.join(out_root, run)
            torch._dynamo.reset()  # each run compiles its own graphs
            reset_compile_counts()
            torch.compile = functools.partial(compile_with, backend=backend) if backend else compile_with
            train.train(load_config([*args, f"--out_dir={out_dir}", *extra]), info)
            if backend:
                with open(os.path.join(out_dir, f"compile_counts_rank{info.rank}.json"), "w") as f:
                    json.dump(compile_counts(), f)
    finally:
        torch.compile = compile_with
        teardown_distributed()


if __name__ == "__main__":
    main()
