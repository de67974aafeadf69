"""Run `python train.py ARGS` (train.main) under torchrun for each ARGS list in a JSON file, one after another
in the same processes (the later runs reuse the first one's process group).
TEST_PG_TIMEOUT (seconds) replaces the process-group timeout (--hang_timeout_s + 60 s), so a rank stuck in a collective fails
the launch within it."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402
from gpt2_pretrain import distributed  # noqa: E402


def main():
    timeout = int(os.environ.get("TEST_PG_TIMEOUT", "300"))
    # in place of the timeout train.main derives from --hang_timeout_s
    train.setup_distributed = lambda device, timeout_seconds=None: distributed.setup_distributed(device, timeout)
    with open(sys.argv[1]) as f:
        commands = json.load(f)
    for argv in commands:
        if os.environ.get("RANK") == "0":
            print(f"command: train.py {' '.join(argv)}", flush=True)
        train.main(argv)


if __name__ == "__main__":
    main()
