"""Save and load training checkpoints with atomic writes.

A checkpoint is one torch file of plain data: model weights (names without torch.compile's or DDP's
prefixes), optimizer state, step and the resolved config, so `torch.load(weights_only=True)` reads it.
"""

import os

import torch


def clean_state_dict(model):
    """Weights of the bare model: unwrap DDP (.module) and torch.compile (._orig_mod)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model.state_dict()


def atomic_save(obj, path):
    """Write to a temporary file, flush and fsync, then rename: a crash mid-save leaves `path` as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path, device="cpu"):
    return torch.load(path, map_location=device, weights_only=True)
