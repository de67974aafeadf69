"""torchrun's restarts (`--max-restarts=N`): which attempt of which job this process is, and what each attempt
needs to start clean.

torchrun restarts every worker of the job when one fails (exits non-zero, is killed, or its watchdog gives
up: watchdog.py), up to N times; each attempt resumes from the latest checkpoint (--resume=auto). The job is
named by TORCHELASTIC_RUN_ID (torchrun's --rdzv_id, a fresh uuid with --standalone) and the attempt by
TORCHELASTIC_RESTART_COUNT (0 for the first). Outside torchrun there is no job and every function here says so.
"""

import datetime
import os
import re

import torch.distributed as dist


def job():
    """(run id, restart count, max restarts) under torchrun, else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return (os.environ["TORCHELASTIC_RUN_ID"], int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")))


def restarts_left():
    """How many more times torchrun will restart the job when this attempt fails (0 outside torchrun)."""
    current = job()
    return current[2] - current[1] if current else 0


def next_attempt_note():
    """'torchrun restarts the job (restart 1 of 2) ...', or None when no restart is left."""
    if not restarts_left():
        return None
    _, restart, max_restarts = job()
    return (f"torchrun restarts the job (restart {restart + 1} of {max_restarts}), which resumes from the latest "
            f"checkpoint")


def attempt_store(timeout_seconds):
    """The store this attempt's process group meets in, or None (init_process_group's env:// then).

    torchrun's agent serves one store for the job's whole life and every attempt's workers connect to it
    (TORCHELASTIC_USE_AGENT_STORE); the keys the previous attempt's process group left there (each rank's
    address) would be read again by the next one, whose ranks would then dial addresses that are gone. A
    prefix of the attempt's number gives each attempt keys of its own."""
    current = job()
    if current is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=timeout_seconds))
    return dist.PrefixStore(f"gpt2_attempt_{current[1]}", store)


def holder_tag():
    """What the out_dir lock's holder writes about its job, so that the next attempt knows its own job."""
    current = job()
    return f" [torchrun job {current[0]} attempt {current[1]}]" if current else ""


def is_earlier_attempt(holder):
    """True when the lock's holder (its text) is an earlier attempt of this torchrun job: torchrun has stopped
    it to restart the job, and it is on its way out."""
    current = job()
    found = re.search(r"\[torchrun job (\S+) attempt (\d+)\]", holder)
    return bool(current and found and found.group(1) == current[0] and int(found.group(2)) < current[1])
