"""Run train.train() under torchrun, then save this rank's parameters to out_dir/rank{R}.pt (for tests);
under --parallel=fsdp the whole parameters, gathered from the shards.

TEST_FAIL_RANK=R with TEST_FAIL_MODE=raise|kill|data makes rank R raise (a bug), SIGKILL itself, or meet a
user's mistake that only it sees (a DataError) on its third batch, to check that one failing rank ends the
whole job and that its error reaches the user. TEST_COMPILE_BACKEND=NAME: torch.compile with that backend.
"""

import functools
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import train  # noqa: E402
from config import load_config  # noqa: E402
from data.loader import DataError, DataLoader  # noqa: E402
from gpt2_pretrain.distributed import setup_distributed, teardown_distributed  # noqa: E402
from gpt2_pretrain.errors import reported_as_errors  # noqa: E402


def fail_after(calls, mode):
    original = DataLoader.next_batch
    counter = {"calls": 0}

    def next_batch(self):
        counter["calls"] += 1
        if counter["calls"] > calls:
            if mode == "kill":
                print(f"test: SIGKILL at {time.time()}", file=sys.stderr, flush=True)  # when, for the test
                os.kill(os.getpid(), signal.SIGKILL)
            if mode == "data":
                raise DataError("injected: a shard only this rank reads is unreadable")
            raise RuntimeError("injected failure on this rank")
        return original(self)

    DataLoader.next_batch = next_batch


def main():
    config = load_config(sys.argv[1:])
    info = setup_distributed(config.device)
    if os.environ.get("TEST_COMPILE_BACKEND"):
        torch.compile = functools.partial(torch.compile, backend=os.environ["TEST_COMPILE_BACKEND"])
    if info.rank == int(os.environ.get("TEST_FAIL_RANK", "-1")):
        fail_after(2, os.environ.get("TEST_FAIL_MODE", "raise"))
    try:
        with reported_as_errors(DataError):
            model = train.train(config, info)
            state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
            torch.save(state, os.path.join(config.out_dir, f"rank{info.rank}.pt"))
    finally:
        teardown_distributed()


if __name__ == "__main__":
    main()
