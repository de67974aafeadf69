"""The one way this tool writes a file: through a temporary name, fsynced, renamed into place, the rename made
durable. A crash or a full disk leaves the old file (or none), never half of the new one.

Checkpoints, shards, manifests, configs, HellaSwag's download and Hugging Face exports all go through here.
The temporary is `PATH.tmp.PID`: two processes writing the same path (ranks on one node, two jobs) never
share one, and a killed writer's leftover is recognisable by its name.
"""

import contextlib
import os


def fsync_path(path):
    """Make a file's contents, or a folder's entries (a rename into it, say), durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """A temporary file name to write `path` through (for writers that want a name, not a file object):
    when the block ends it is fsynced and renamed onto `path`; when the block raises it is removed."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def atomic_write(path, write):
    """Write `path` atomically: `write(f)` fills a binary file object."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)


class WriteRecorder:
    """A file for torch.save that keeps the OSError (a full disk, say) of a write that fails: torch words
    it as "unexpected pos"; leaving the `with` block raises the OSError behind it instead."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.file.flush()

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if isinstance(value, RuntimeError) and self.error is not None:
            raise self.error from None
        return False


def atomic_save(obj, path):
    """torch.save(obj) to `path` atomically, creating its folder; a full disk raises its own OSError."""
    import torch  # here, not at the top: data/prepare.py's workers write shards without importing torch

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def save(f):
        with WriteRecorder(f) as writer:
            torch.save(obj, writer)

    atomic_write(path, save)
