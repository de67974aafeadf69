"""A lost terminal loses nothing: a closed stdout, Ctrl-C under `| tee` and SIGHUP each end in a checkpoint,
and out_dir/console.log keeps every line the run printed. The old code died of BrokenPipeError at the first
line after the reader went, without its final checkpoint, and SIGHUP killed it outright."""

import os
import signal
import subprocess
import sys

import pytest
import torch

import train
from gpt2_pretrain import console
from gpt2_pretrain.distributed import print0
from tests.conftest import DELAY, RESUME_ARGS, ROOT, finish, read_metrics, start, tiny_args, wait_for


def command(out_dir, token_dir):
    return [sys.executable, "train.py", *tiny_args(token_dir, out_dir, *RESUME_ARGS)]


def logged(out_dir, step):
    path = os.path.join(out_dir, "metrics.jsonl")
    return os.path.isfile(path) and any(m.get("step") == step and "loss" in m for m in read_metrics(out_dir))


def console_log(out_dir):
    with open(os.path.join(out_dir, "console.log")) as f:
        return f.read()


@pytest.mark.slow  # runs training in a process and closes its pipe
def test_a_closed_stdout_never_stops_the_run(token_dir, tmp_path):
    # `train.py ... | head -n 2`: the reader takes two lines and goes
    out = str(tmp_path / "run")
    run = start(command(out, token_dir))
    first_lines = [run.stdout.readline() for _ in range(2)]
    run.stdout.close()
    assert run.wait(timeout=120) == 0, first_lines
    assert torch.load(os.path.join(out, "ckpt_000008.pt"), weights_only=True)["step"] == 8
    printed = console_log(out)
    assert first_lines[0] in printed and "run finished at step 8/8" in printed


@pytest.mark.slow  # runs training in a process and signals it
def test_ctrl_c_under_tee_checkpoints_like_without_the_pipe(token_dir, tmp_path):
    # the terminal sends SIGINT to the whole pipeline: tee ends at once, train.py finishes its step
    out = str(tmp_path / "run")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **DELAY)
    run = subprocess.Popen(command(out, token_dir), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, process_group=0)  # tee joins its group below
    with open(tmp_path / "tee.txt", "wb") as teed:
        tee = subprocess.Popen(["tee"], stdin=run.stdout, stdout=teed, process_group=run.pid)
    run.stdout.close()  # tee holds the only reading end
    try:
        wait_for(lambda: logged(out, 2), run)
        os.killpg(run.pid, signal.SIGINT)
        assert run.wait(timeout=120) == 0
    finally:
        for process in (run, tee):
            if process.poll() is None:
                process.kill()
        tee.wait()
    printed = console_log(out)
    stopped_at = int(printed.split("stopped by SIGINT at step ")[1].split(";")[0])
    assert torch.load(os.path.join(out, f"ckpt_{stopped_at:06d}.pt"), weights_only=True)["step"] == stopped_at
    assert f"run stopped by SIGINT at step {stopped_at}/8" in printed


@pytest.mark.slow  # runs training in a process and signals it
def test_sighup_stops_like_sigterm(token_dir, tmp_path):
    out = str(tmp_path / "run")
    run = start(command(out, token_dir), env=DELAY)
    wait_for(lambda: logged(out, 2), run)
    run.send_signal(signal.SIGHUP)
    code, output = finish(run)
    assert code == 0, output
    stopped_at = int(output.split("stopped by SIGHUP at step ")[1].split(";")[0])
    assert torch.load(os.path.join(out, f"ckpt_{stopped_at:06d}.pt"), weights_only=True)["step"] == stopped_at
    assert f"run stopped by SIGHUP at step {stopped_at}/8" in console_log(out)


def torch_is_loading(pid):
    """Whether process `pid` has mapped torch's library: it is inside `import torch`, past train.py's first
    lines (or done with it)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "libtorch" in f.read()
    except OSError:
        return False


@pytest.mark.slow  # starts train.py and interrupts it
def test_ctrl_c_while_torch_loads_is_one_line(token_dir, tmp_path):
    # the old code: Python's KeyboardInterrupt traceback from inside `import torch`
    out = str(tmp_path / "run")
    run = start(command(out, token_dir))
    wait_for(lambda: torch_is_loading(run.pid), run, timeout=60)
    run.send_signal(signal.SIGINT)
    code, output = finish(run)
    # still loading: the loading line; past it already: start-up's own line. One line either way
    assert code == 2 and "Traceback" not in output, output
    assert output.count("error: ") == 1 and "error: interrupted by Ctrl-C" in output, output
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))


def test_a_console_log_on_a_full_disk_never_stops_the_run(token_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    os.makedirs(out)
    os.symlink("/dev/full", os.path.join(out, "console.log"))  # every write fails with ENOSPC
    train.main(tiny_args(token_dir, out, "--max_steps=2"))
    assert "run finished at step 2/2" in capsys.readouterr().out
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [0, 1]


def test_print0_drops_lines_nobody_reads_and_the_copy_keeps_them(tmp_path, monkeypatch):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone, as after `| head -n 2`
    monkeypatch.setattr(sys, "stdout", os.fdopen(write_end, "w"))
    console.begin()
    try:
        for number in range(3):
            print0(f"line {number}")  # the old print0 raised BrokenPipeError here
        console.copy_to(str(tmp_path / "console.log"))
        print0("line 3")
    finally:
        console.end()
        sys.stdout.close()
    assert (tmp_path / "console.log").read_text() == "".join(f"line {n}\n" for n in range(4))
