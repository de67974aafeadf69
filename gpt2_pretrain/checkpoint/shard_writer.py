"""DCP's file writer for sharded checkpoints, keeping the OSError of a write that fails (a full disk).

DCP writes each tensor into its shard file with torch.save, which words a failed write as "RuntimeError:
[enforce fail at inline_container.cc] unexpected pos": the errno is gone by the time the save raises. Every
file DCP opens goes through a stream here that records the first OSError, so save_sharded can report a full
disk as one, on every rank (sharded.py). Imported only where a sharded save runs: DCP costs start-up time.

Test hook: GPT2_DEBUG_FULL_SHARD_STEPS=4,8 makes the last rank's shard file of the checkpoints at those steps
fail with ENOSPC at the first write of a tensor's bytes (4 KB or more, inside its torch.save): a disk that
fills up in the middle of a shard.
"""

import contextlib
import errno
import os
import sys

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

DEBUG_FULL_AT_BYTES = 4096  # a write this large inside torch.save: a tensor's bytes


def inside_torch_save():
    """Whether torch.save is on the call stack (the test hook fails a tensor's write, not DCP's own bytes)."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "_save" and frame.f_code.co_filename.endswith("serialization.py"):
            return True
        frame = frame.f_back
    return False


class RecordedStream:
    """A file whose failed write or flush leaves its OSError in `owner.error`; everything else is the file's."""

    def __init__(self, file, owner, full_at=None):
        self.file, self.owner, self.full_at = file, owner, full_at

    def write(self, data):
        try:
            size = memoryview(data).nbytes
            if self.full_at is not None and size >= self.full_at and inside_torch_save():  # test hook
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.file.write(data)
        except OSError as e:
            self.owner.error = self.owner.error or e
            raise

    def flush(self):
        try:
            return self.file.flush()
        except OSError as e:
            self.owner.error = self.owner.error or e
            raise

    def __getattr__(self, name):  # tell, fileno, close, ...
        return getattr(self.file, name)


class RecordingFileSystem(FileSystem):
    def __init__(self, full_at=None):
        super().__init__()
        self.error, self.full_at = None, full_at

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as stream:
            full_at = self.full_at if str(path).endswith(".distcp") else None
            yield RecordedStream(stream, self, full_at) if "w" in mode else stream


def shard_writer(path, step, rank, world_size):
    """A FileSystemWriter into `path` whose `.fs.error` is the first OSError any of its writes met."""
    writer = FileSystemWriter(path)
    full = str(step) in os.environ.get("GPT2_DEBUG_FULL_SHARD_STEPS", "").split(",") and rank == world_size - 1
    writer.fs = RecordingFileSystem(DEBUG_FULL_AT_BYTES if full else None)
    return writer
