"""The checksum every checkpoint carries, checked before it is used: a checkpoint whose bytes changed on disk
(a bad sector, a copy cut short, a stray write into the file) is unusable, never loaded.

A .pt checkpoint stores content_digest(checkpoint) under "checksum": a sha256 over what it holds (each
tensor's dtype, shape and bytes, and the plain data around them), computed from the object before
torch.save and again from what torch.load returns. So checking costs one pass over the loaded data and no
second read of the file, and a change anywhere (in a tensor's bytes, or in the pickle, which then fails to
load) is caught. A sharded checkpoint (.dcp folder) lists the sha256 and size of each of its files in
meta.pt, whose own content digest covers those lists: a missing or cut shard is found before any is hashed.

Checkpoints written before checksums existed carry none; they are used as they are.
"""

import hashlib
import os

import torch

CHECKSUM = "checksum"
FILES = "files"  # a sharded checkpoint's {file name: sha256} in meta.pt
SIZES = "file_sizes"  # and {file name: bytes}; absent in those written before it was kept


def _feed(digest, obj):
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the bytes, whatever the dtype
    elif isinstance(obj, dict):
        digest.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            digest.update(f"K{key!r}".encode())
            _feed(digest, obj[key])
    elif isinstance(obj, (list, tuple)):  # a tuple may come back from torch.load as either
        digest.update(f"L{len(obj)}".encode())
        for item in obj:
            _feed(digest, item)
    else:
        digest.update(f"V{type(obj).__name__}:{obj!r}".encode())


def content_digest(checkpoint):
    """sha256 (hex) of a checkpoint's content, its own "checksum" key left out."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in checkpoint.items() if k != CHECKSUM})
    return digest.hexdigest()


def with_checksum(checkpoint):
    return {**checkpoint, CHECKSUM: content_digest(checkpoint)}


def file_digest(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def folder_digests(folder, leave_out=(), prefix=""):
    """{name: sha256} of the files of a sharded checkpoint folder (those whose name starts with `prefix`)."""
    return {name: file_digest(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
            if name.startswith(prefix) and name not in leave_out and os.path.isfile(os.path.join(folder, name))}


def checksum_problem(path, checkpoint):
    """None when `checkpoint` (as loaded from `path`) holds what was written, else why it does not."""
    if not isinstance(checkpoint, dict) or CHECKSUM not in checkpoint:
        return None  # written before checksums
    if content_digest(checkpoint) != checkpoint[CHECKSUM]:
        return "its content does not match its checksum: the file changed after it was written"
    files, sizes = checkpoint.get(FILES) or {}, checkpoint.get(SIZES) or {}
    for name in files:  # every file's presence and size first: cheap, and the clearest words for a cut copy
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"its file {name} is missing"
        size = os.path.getsize(file)
        if name in sizes and size != sizes[name]:
            return f"its file {name} is {size:,} bytes, {sizes[name]:,} when written: it was cut or changed"
    for name, expected in files.items():
        if file_digest(os.path.join(path, name)) != expected:
            return f"its file {name} does not match its checksum: it changed after it was written"
    return None
