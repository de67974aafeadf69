"""No silent hangs: a rank that makes no progress for --hang_timeout_s seconds writes where it is and exits.

Under torchrun a thread watches the training loop, which feeds it once per step (beat(): two attribute
writes, no host sync, no wait for the device). When no beat comes for hang_timeout_s seconds (a rank
frozen or stuck before a collective, a collective that never completes, a data read that never returns)
the rank writes the step it was at and the Python stacks of all its threads (faulthandler) to its stderr,
then exits with code 3: torchrun (--max-restarts=N) restarts the job, which resumes from its latest checkpoint,
or, when the restarts are used up, the job ends with one `error:` line. Every live rank of a hung job does
the same (a rank waiting in a collective for a hung one makes no progress either), so the log holds every
live rank's stack.

The process group's timeout is hang_timeout_s + PROCESS_GROUP_MARGIN_SECONDS (process_group_timeout): the
backend's own timeout (gloo's, NCCL's watchdog) is a backstop that fires after the watchdog has reported.

A rank stopped by SIGSTOP cannot take torchrun's SIGTERM, and torchrun waits 30 s before its SIGKILL; the
watchdog continues (SIGCONT) the stopped workers of its torchrun agent before it exits, so that they meet
the lost peer at once and exit, and the restart follows within seconds. Time during which this process
itself was stopped (Slurm's suspend, SIGSTOP to the whole job) does not count as a hang: the watchdog notices
its own missed wake-ups and starts counting again.
"""

import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time

from gpt2_pretrain import console
from gpt2_pretrain.distributed import stop_signals_blocked
from gpt2_pretrain.elastic import job, next_attempt_note
from gpt2_pretrain.errors import claim_job_line

EXIT_CODE = 3  # a hang; fail()'s user errors exit with 2
PROCESS_GROUP_MARGIN_SECONDS = 60  # the backend's timeout comes this long after the watchdog's


def process_group_timeout(hang_timeout_s):
    """Seconds for init_process_group's timeout: the watchdog reports a hang (with the stacks) before gloo or
    NCCL end a collective that waits for a hung rank (without them)."""
    return hang_timeout_s + PROCESS_GROUP_MARGIN_SECONDS


_running = []  # the watchdog of the run in progress in this process (watching()), fed by beat()


@contextlib.contextmanager
def watching(timeout, rank=0, enabled=None):
    """Around a run: a Watchdog that beat() feeds, stopped however the run ends (an error in the run is
    reported after it stops, so a slow report is not taken for a hang)."""
    watchdog = Watchdog(timeout, rank, enabled)
    _running.append(watchdog)
    try:
        yield watchdog
    finally:
        _running.remove(watchdog)
        watchdog.stop()


def beat(step):
    """The training loop reached `step` (host-side only: no sync; None: it ended); nothing when no watchdog runs."""
    for watchdog in _running:
        watchdog.beat(step)


class Watchdog:
    """Exits the process when beat() is not called for `timeout` seconds; armed from the first beat, and
    idle outside torchrun (a lone process has no collective to hang in, and nothing would restart it)."""

    def __init__(self, timeout, rank=0, enabled=None):
        self.timeout, self.rank = timeout, rank
        self.step, self.last = None, None  # written by beat() in the loop, read by the thread
        self.stopped = threading.Event()
        if enabled is None:
            enabled = job() is not None
        self.thread = None
        if enabled:
            self.thread = threading.Thread(target=self._watch, name="gpt2-watchdog", daemon=True)
            with stop_signals_blocked():  # a stop signal is the main thread's to take
                self.thread.start()

    def beat(self, step):
        """The loop reached `step`: progress. Host-side only. None: the loop is over, nothing to watch."""
        self.step, self.last = step, None if step is None else time.monotonic()

    def stop(self):
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()

    def _watch(self):
        poll = min(1.0, self.timeout / 8)
        woke = time.monotonic()
        while not self.stopped.wait(poll):
            now, last = time.monotonic(), self.last
            if last is not None and now - woke > poll + max(self.timeout / 2, 1.0):
                self.last = last = now  # this process was stopped (or starved) itself: not a hang of the job
            woke = now
            if last is not None and now - last > self.timeout:
                self._report_and_exit(now - last)

    def _report_and_exit(self, idle):
        where = (f"rank {self.rank} made no progress for {idle:.0f} s at step {self.step} "
                 f"(--hang_timeout_s={self.timeout:g})")
        restart = next_attempt_note()
        console.write(f"watchdog: {where}; the stacks of its threads follow (most recent call first)\n", sys.stderr)
        with contextlib.suppress(OSError, ValueError, AttributeError):  # a closed or missing stderr
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        first = claim_job_line(where, self.rank)  # other ranks' lost-peer lines are then not printed
        if restart:
            console.write(f"watchdog: rank {self.rank} exits; {restart}\n", sys.stderr)
        elif first:
            console.write(f"error: {where}, and torchrun has no restart left: the stacks above show where each live "
                          f"rank was. The checkpoints in out_dir are kept: find what stopped it (a stuck collective, "
                          f"data read, GPU or node), then run the command again (--resume=auto continues); raise "
                          f"--hang_timeout_s if a step, evaluation or checkpoint really takes that long.\n", sys.stderr)
        continue_stopped_siblings()
        with contextlib.suppress(OSError, ValueError, AttributeError):
            sys.stderr.flush()
        os._exit(EXIT_CODE)


def continue_stopped_siblings():
    """SIGCONT to the stopped (SIGSTOP, state T) workers of this process's torchrun agent: a stopped process
    takes no SIGTERM, and torchrun would wait 30 s before its SIGKILL. Linux (/proc) only."""
    parent = os.getppid()
    if parent <= 1 or not os.path.isdir("/proc"):
        return
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            if int(ppid) == parent and state == "T" and int(pid) != os.getpid():
                os.kill(int(pid), signal.SIGCONT)
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to signal
