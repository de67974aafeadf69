"""torch.compile under --parallel=fsdp, eager and compiled runs in one torchrun launch (for tests/test_parallel.py).

    torchrun --nproc_per_node=2 tests/compile_worker.py OUT_ROOT TRAIN_ARGS...

Trains with TRAIN_ARGS (fsdp, evaluations, a sample and HellaSwag) into OUT_ROOT/eager, then compiled as
train.py compiles (inductor, or the backend TEST_COMPILED_BACKEND names) into OUT_ROOT/compiled, then compiled with --activation_checkpointing=full into
OUT_ROOT/compiled_ac with the aot_eager backend (dynamo's and autograd's graphs run as they are, without
inductor's C++ compilation of a second set); after each compiled run, compiling.compile_counts() of that run
goes to its folder as compile_counts_rank{R}.json. Last, the order this code had before: the tiny model
sharded, then compiled whole (aot_eager), one step; its compile_counts() to OUT_ROOT/old_order_rank{R}.json.
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
from gpt2_pretrain.parallel import shard_model  # noqa: E402


# TEST_COMPILED_BACKEND: the backend of the "compiled" run (inductor, train.py's, unless the test names another)
COMPILED_BACKEND = os.environ.get("TEST_COMPILED_BACKEND", "inductor")


def old_order_counts(info):
    """compile_counts() of one training step of the tiny model compiled whole after fully_shard."""
    torch._dynamo.reset()
    reset_compile_counts()
    config = train.GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=2, n_embd=32)
    model = torch.compile(shard_model(train.GPT(config), info), backend="aot_eager")
    x = torch.randint(0, 128, (2, config.block_size))
    model(x, x)[1].backward()
    return compile_counts()


def main():
    out_root, args = sys.argv[1], sys.argv[2:]
    info = setup_distributed("cpu")
    compile_with = torch.compile
    try:
        for run, extra, backend in (("eager", [], None), ("compiled", ["--compile"], COMPILED_BACKEND),
                                    ("compiled_ac", ["--compile", "--activation_checkpointing=full"], "aot_eager")):
            out_dir = os.path.join(out_root, run)
            torch._dynamo.reset()  # each run compiles its own graphs
            reset_compile_counts()
            torch.compile = functools.partial(compile_with, backend=backend) if backend else compile_with
            train.train(load_config([*args, f"--out_dir={out_dir}", *extra]), info)
            if backend:
                with open(os.path.join(out_dir, f"compile_counts_rank{info.rank}.json"), "w") as f:
                    json.dump(compile_counts(), f)
        # compiled whole, the loss op compiles its per-chunk softmax too (torch.compile): on aot_eager as well,
        # not with an inductor build on both ranks for this one step
        torch.compile = functools.partial(compile_with, backend="aot_eager")
        with open(os.path.join(out_root, f"old_order_rank{info.rank}.json"), "w") as f:
            json.dump(old_order_counts(info), f)
    finally:
        torch.compile = compile_with
        teardown_distributed()


if __name__ == "__main__":
    main()
