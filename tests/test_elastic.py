"""Runs that heal themselves: torchrun --max-restarts restarts the job when a worker is killed or hangs (the
watchdog), Slurm's signal before the time limit checkpoints the job, and each start resumes exactly: the
losses equal an uninterrupted run's, bit for bit. Also the out_dir lock, which lets a restart of the same
torchrun job in and keeps any other job out.
"""

import contextlib
import os
import signal
import socket
import sys
import threading
import time

import pytest
import torch

from config import ConfigError
from gpt2_pretrain import errors
from gpt2_pretrain.checkpoint.files import latest_valid, list_checkpoints, try_load
from gpt2_pretrain.errors import hold_out_dir
from gpt2_pretrain.watchdog import Watchdog, beat, watching
from tests.conftest import (DELAY, RESUME_ARGS, ROOT, curve, make_token_shards, read_metrics, start, tiny_args,
                            workers)

HANG_TIMEOUT = 3  # seconds: a step here takes about 0.3 s (DELAY), a checkpoint or evaluation far less
# from a hang to the watchdog's report: its timeout, a poll (at most a second), and slack for a loaded machine
DETECTION_BOUND = HANG_TIMEOUT + 4


class Lines:
    """A process's output, each line with the time it came (a thread reads the pipe as it fills)."""

    def __init__(self, process):
        self.process, self.lines = process, []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line))

    def first(self, text, after=0.0):
        """The time of the first line holding `text` that came after `after`, or None."""
        return next((t for t, line in list(self.lines) if t > after and text in line), None)

    @property
    def text(self):
        return "".join(line for _, line in self.lines)

    def finish(self, timeout=120):
        try:
            code = self.process.wait(timeout)
        finally:
            self.thread.join(10)
        return code, self.text


def wait_until(condition, lines, timeout=120):
    """Poll `condition` until it holds; fail with the output when the process ends first or time runs out."""
    deadline = time.time() + timeout
    while not condition():
        assert lines.process.poll() is None, f"the job ended early:\n{lines.text}"
        assert time.time() < deadline, f"timed out:\n{lines.text}"
        time.sleep(0.02)


def torchrun_job(out_dir, token_dir, *launcher_flags, env=DELAY):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *launcher_flags, "train.py", *tiny_args(token_dir, out_dir, *RESUME_ARGS,
                                                       f"--hang_timeout_s={HANG_TIMEOUT}")]
    return Lines(start(command, env=env))


def exists(out_dir, name):
    return lambda: os.path.exists(os.path.join(out_dir, name))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(token_dir, out_dir) of an uninterrupted 2-process run, shared by the tests here."""
    root = tmp_path_factory.mktemp("elastic")
    token_dir, out = make_token_shards(str(root / "tokens")), str(root / "reference")
    code, output = torchrun_job(out, token_dir, env=None).finish()
    assert code == 0, output
    return token_dir, out


def records(out_dir):
    """[(step, loss, val_loss)] of metrics.jsonl, one a record that holds either."""
    return [(m["step"], m.get("loss"), m.get("val_loss")) for m in read_metrics(out_dir)
            if {"loss", "val_loss"} & m.keys()]


@pytest.mark.slow
def test_a_killed_then_a_hung_worker_are_restarted_by_torchrun_and_the_losses_match(reference, tmp_path):
    token_dir, reference_out = reference
    out = str(tmp_path / "out")
    job = torchrun_job(out, token_dir, "--max-restarts=2")

    # a worker killed at once (OOM killer, a GPU error): torchrun restarts the group, which resumes at step 3
    wait_until(exists(out, "ckpt_000003.pt"), job)
    first = workers(job.process.pid)
    os.kill(first[1], signal.SIGKILL)
    killed = time.monotonic()

    def training_again():  # the resumed attempt's first step (the killed attempt may still log its step 3)
        resumed = job.first("resumed from", after=killed)
        return resumed and job.first("step     3/8 |", after=resumed)

    wait_until(training_again, job)
    print(f"SIGKILL to training again: {training_again() - killed:.1f} s")

    # a worker frozen (SIGSTOP): the live rank's watchdog reports its stack and exits; the job restarts again
    second = workers(job.process.pid)
    assert set(second.values()).isdisjoint(first.values())
    os.kill(second[1], signal.SIGSTOP)
    stopped = time.monotonic()
    wait_until(lambda: job.first("watchdog: rank 0 made no progress", after=stopped), job)
    detected = job.first("watchdog: rank 0 made no progress", after=stopped) - stopped
    print(f"SIGSTOP to the watchdog's report: {detected:.1f} s")
    assert detected < DETECTION_BOUND

    code, output = job.finish()
    assert code == 0, output  # exits by itself: two restarts were allowed, two were used
    assert ("warning: lost contact with rank 1" in output and
            "torchrun restarts the job (restart 1 of 2), which resumes from the latest checkpoint" in output)
    report = output.split("watchdog: rank 0 made no progress for")[1]
    assert " (--hang_timeout_s=3); the stacks of its threads follow" in report
    assert 'train.py", line' in report and " in train" in report, report  # the main thread's stack
    assert "watchdog: rank 0 exits; torchrun restarts the job (restart 2 of 2)" in output
    assert "error:" not in output
    assert output.count("resumed from") == 2
    assert curve(out) == curve(reference_out)


@pytest.mark.slow
def test_a_hang_with_no_restart_left_is_one_error_and_out_dir_is_kept_resumable(reference, tmp_path):
    token_dir, reference_out = reference
    out = str(tmp_path / "out")
    job = torchrun_job(out, token_dir)  # torchrun's default: no restart
    wait_until(exists(out, "ckpt_000003.pt"), job)
    os.kill(workers(job.process.pid)[1], signal.SIGSTOP)
    code, output = job.finish()
    assert code != 0
    ours = [line for line in output.splitlines() if "error:" in line]
    assert len(ours) == 1 and ours[0].startswith("error: rank 0 made no progress for"), output
    assert "torchrun has no restart left: the stacks above show where each live rank was" in ours[0]
    assert "watchdog: rank 0 made no progress" in output and "lost contact" not in output

    # out_dir is intact and resumable: every checkpoint is usable, --resume=auto takes the newest (what it then
    # does, exactly: tests/test_resume.py), and the metrics so far are the reference's
    skipped = []
    path, checkpoint = latest_valid(out, warn=skipped.append)
    assert not skipped and checkpoint["step"] >= 3 and path == list_checkpoints(out)[0][1]
    assert all(try_load(path)[0] is not None for _, path in list_checkpoints(out))
    so_far = records(out)
    assert len(so_far) >= 5 and so_far == records(reference_out)[:len(so_far)]  # steps 0-2 and the val losses at 0, 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_slurm_nodes_survive_a_suspend_and_checkpoint_on_the_time_limit_signal(reference, tmp_path):
    """scripts/slurm/node.sh as srun runs it on each of two nodes (here both on this machine, with the SLURM_*
    variables an allocation sets); out_dir is shared, as on a cluster."""
    token_dir, reference_out = reference
    out = str(tmp_path / "out")
    port, node_script = free_port(), os.path.join(ROOT, "scripts", "slurm", "node.sh")

    allocation = dict(DELAY, SLURM_JOB_ID="4242", SLURM_NNODES="2", RDZV_HOST="127.0.0.1", RDZV_PORT=str(port),
                      NPROC_PER_NODE="1", PYTHON=sys.executable)
    args = tiny_args(token_dir, out, *RESUME_ARGS, f"--hang_timeout_s={HANG_TIMEOUT}")
    jobs = [Lines(start(["bash", node_script, *args], env=dict(allocation, SLURM_NODEID=str(node)))) for node in (0, 1)]
    wait_until(exists(out, "ckpt_000003.pt"), jobs[0])
    everything = [pid for job in jobs for pid in [job.process.pid, *workers(job.process.pid).values()]]
    # scontrol suspend: every process of the job stopped, for longer than the hang timeout, then continued;
    # no rank made progress meanwhile, and none is a hang: the watchdogs count only time they were awake
    for pid in everything:
        os.kill(pid, signal.SIGSTOP)
    time.sleep(HANG_TIMEOUT + 1)  # the suspension itself: the condition under test is its length
    for pid in everything:
        os.kill(pid, signal.SIGCONT)
    # the time limit near: train.sbatch's trap sends SIGUSR1 to every process of the job (scancel --signal)
    for pid in everything:
        os.kill(pid, signal.SIGUSR1)
    outputs = [job.finish() for job in jobs]
    both = outputs[0][1] + outputs[1][1]
    assert "stopped by SIGUSR1 at step" in both, both
    assert "watchdog:" not in both and "error:" not in both
    stopped_at = int(both.split("stopped by SIGUSR1 at step ")[1].split(";")[0])
    assert torch.load(os.path.join(out, f"ckpt_{stopped_at:06d}.pt"), weights_only=True)["step"] == stopped_at
    # the two nodes trained as the 2-process reference did, up to the stop (resuming exactly from a stop and
    # from two nodes: tests/test_resume.py and tests/test_multinode.py)
    assert records(out) == [r for r in records(reference_out) if r[0] < stopped_at]


def test_a_restart_of_the_same_torchrun_job_waits_for_its_previous_attempt_and_another_job_is_refused(
        tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    previous = contextlib.ExitStack()
    previous.enter_context(hold_out_dir(out))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun's restart, while attempt 0 is still exiting
    release = threading.Timer(0.5, previous.close)
    release.start()
    started = time.time()
    with hold_out_dir(out):
        waited = time.time() - started
        assert waited > 0.3  # the lock was taken once attempt 0 let go of it, not before
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")  # another job on the same out_dir
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
        with pytest.raises(ConfigError, match=r"is in use by another run \(pid .*\[torchrun job job-a attempt 1\]"):
            with hold_out_dir(out):
                pass
        # a later attempt of job-a waits for attempt 1, but not for ever
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
        monkeypatch.setattr(errors, "RESTART_LOCK_WAIT_SECONDS", 0.3)
        with pytest.raises(ConfigError, match="still held by the previous attempt of this torchrun job"):
            with hold_out_dir(out):
                pass


def test_the_watchdog_fires_after_its_timeout_without_a_step_and_not_while_steps_come(monkeypatch):
    fired = []

    def report(watchdog, idle):  # instead of writing the stacks and exiting the process
        fired.append((watchdog.step, idle, time.monotonic()))
        watchdog.stopped.set()

    monkeypatch.setattr(Watchdog, "_report_and_exit", report)
    with watching(1.5, rank=0, enabled=True):
        started = time.monotonic()
        for step in range(20):  # a step every 0.1 s for 2 s: longer than the timeout in all, never so long apart
            beat(step)
            time.sleep(0.1)  # the steps' pace is the condition under test
        assert not fired
        last_beat = time.monotonic()
        beat(20)
        while not fired and time.monotonic() < started + 30:
            time.sleep(0.02)
    step, idle, when = fired[0]
    assert step == 20 and idle > 1.5 and when - last_beat < 1.5 + 2  # the timeout, a poll and slack for a loaded CPU
