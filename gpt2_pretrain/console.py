"""What a run prints: to the terminal while one listens, and a copy in out_dir/console.log.

A closed stdout or stderr (a pipe whose reader is gone: `| head -n 2`, a `| tee` that Ctrl-C ended, a lost
terminal) never stops training: a line that cannot be printed is dropped, and the stream is pointed at
/dev/null so that later lines, and Python's flush at exit, pass quietly. The copy keeps every line: the
lines before the run's first metrics record wait in memory, so a run refused at start writes no file.
"""

import contextlib
import os
import sys

MAX_WAITING_LINES = 10_000  # a bound on what waits for the file; a run's start prints a few hundred lines

_copy = {"file": None, "waiting": []}


def begin():
    """A run starts (again in the same process, in tests): forget the previous run's copy."""
    end()
    _copy["waiting"] = []


def end():
    file, _copy["file"] = _copy["file"], None
    if file is not None:
        with contextlib.suppress(OSError):  # a full disk fails the last flush again
            file.close()


def copy_to(path):
    """From now on every line also goes to `path` (appended), the lines printed so far first."""
    if _copy["file"] is not None or _copy["waiting"] is None:  # copying already, or given up on a full disk
        return
    waiting, _copy["waiting"] = _copy["waiting"], []
    try:
        _copy["file"] = open(path, "a")
    except OSError:  # an out_dir that cannot take the file: the run goes on without the copy
        _copy["waiting"] = None
        return
    _append("".join(waiting))


def _append(text):
    try:
        _copy["file"].write(text)
        _copy["file"].flush()
    except OSError:  # a full disk: the copy stops, the run does not (metrics.jsonl keeps the numbers)
        end()
        _copy["waiting"] = None


def _silence(stream):
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no descriptor (a test's captured stream): nothing to redirect
        pass


def write(text, stream=None):
    """Print `text` to `stream` (stdout), or drop it when nobody reads it any more; copy it either way."""
    if _copy["file"] is not None:
        _append(text)
    elif _copy["waiting"] is not None and len(_copy["waiting"]) < MAX_WAITING_LINES:
        _copy["waiting"].append(text)
    stream = stream or sys.stdout
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError):  # EPIPE (reader gone), EIO (terminal gone), ValueError (stream closed)
        _silence(stream)
