"""The shard files themselves: written atomically, with their sha256. Shared by prepare.py (which writes
them) and loader.py (which checks them); numpy only, so neither pulls in the other's imports.
"""

import hashlib
import os

import numpy as np

from gpt2_pretrain.atomic import atomic_write


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(out_dir, name, tokens):
    """Write tokens as a .npy file atomically; return its manifest entry (without the split)."""
    path = os.path.join(out_dir, name)
    atomic_write(path, lambda f: np.save(f, tokens))
    return {"name": name, "tokens": int(tokens.size), "sha256": sha256_of(path)}
