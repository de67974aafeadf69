"""The shard files themselves: written atomically, named by their sha256. Shared by prepare.py (which writes
them) and loader.py (which checks them); numpy only, so neither pulls in the other's imports.
"""

import hashlib
import os

import numpy as np


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path, write):
    """Write through a temporary name, fsync, then rename: a crash leaves either nothing or the whole file."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(out_dir, name, tokens):
    """Write tokens as a .npy file atomically; return its manifest entry (without the split)."""
    path = os.path.join(out_dir, name)
    atomic_write(path, lambda f: np.save(f, tokens))
    return {"name": name, "tokens": int(tokens.size), "sha256": sha256_of(path)}
