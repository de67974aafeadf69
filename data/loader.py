"""Memory-mapped, rank-aware, resumable batches of token windows from uint16 .npy shards.

The training stream is a sequence of windows of block_size + 1 tokens (x = window[:-1], y = window[1:]).
Each epoch visits the shards, and the windows inside each shard, in an order shuffled from the seed.
A call to next_batch() consumes batch_size * world_size consecutive windows of that stream and rank r
takes its own batch_size of them, so the windows of optimizer step s are the same set whatever the world
size and the micro-batch size. The position in the stream is the whole state. At start every shard is
checked against manifest.json: present, of its token count, and of its sha256 (hashed once per change).
"""

import hashlib
import json
import os
import shlex

import numpy as np
import torch

from data.shards import sha256_of
from gpt2_pretrain.atomic import atomic_write


class DataError(Exception):
    """Missing, truncated or mismatched data: reported to the user as one message."""


RAW_TEXT = (".txt", ".jsonl", ".json", ".parquet")  # what data/prepare.py reads


def raw_text_files(data_dir, limit=1000):
    """The raw text files (what data/prepare.py takes as --source) at data_dir: a file, or a folder's first ones."""
    if os.path.isfile(data_dir):
        return [data_dir] if data_dir.endswith(RAW_TEXT) else []
    found = []
    for root, folders, names in os.walk(data_dir):
        folders[:] = sorted(f for f in folders if not f.startswith("."))  # not .git, .venv and the like
        found += [os.path.join(root, name) for name in sorted(names) if name.endswith(RAW_TEXT)]
        if len(found) >= limit:
            break
    return found


def tokens_folder_for(source):
    """A new folder for the shards of `source`: data/NAME_tokens, never the source itself or a folder inside it."""
    source = os.path.normpath(source)
    name = os.path.splitext(os.path.basename(os.path.abspath(source)))[0] or "my_texts"
    out = os.path.join("data", f"{name}_tokens")
    inside = os.path.commonpath([os.path.abspath(out), os.path.abspath(source)]) == os.path.abspath(source)
    return os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(source)), f"{name}_tokens")) if inside else out


def not_prepared(data_dir):
    """The DataError for a data_dir without manifest.json: what it holds instead, and the command that fixes it."""
    raw = raw_text_files(data_dir)
    if not raw:
        return DataError(
            f"no manifest.json in '{data_dir}': the data has not been prepared. Make it with\n"
            f"  python data/prepare.py --source SOURCE --out {data_dir}\n"
            f"(for the quickstart corpus: make data; for FineWeb-Edu 10B see the README)."
        )
    kinds = sorted({os.path.splitext(path)[1] for path in raw})
    if os.path.isfile(data_dir):
        what = f"is a {kinds[0]} file of raw text"
    else:
        what = f"holds raw text ({len(raw)}{'+' if len(raw) >= 1000 else ''} {'/'.join(kinds)} files)"
    out = tokens_folder_for(data_dir)
    return DataError(
        f"--data_dir={data_dir} {what}, not tokenized shards. Tokenize it into a new folder with\n"
        f"  python data/prepare.py --source {shlex.quote(data_dir)} --out {shlex.quote(out)}\n"
        f"then train with --data_dir={shlex.quote(out)}."
    )


def read_manifest(data_dir):
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.isfile(path):
        raise not_prepared(data_dir)
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read())
    except OSError as e:
        raise DataError(f"cannot read '{path}': {e.strerror}. Check the permissions of {data_dir}.") from None
    except ValueError as e:  # not JSON, or not UTF-8
        raise DataError(f"'{path}' cannot be read as JSON ({e}): it is damaged; re-run data/prepare.py.") from None
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, list) or not all(isinstance(s, dict) and {"name", "tokens", "split"} <= s.keys() and
                                               isinstance(s["name"], str) and type(s["tokens"]) is int
                                               for s in shards) or manifest.get("dtype", "uint16") != "uint16":
        raise DataError(f"'{path}' is not a manifest that data/prepare.py writes (a list of uint16 shards, "
                        f"each with name, tokens and split): prepare this data with data/prepare.py.")
    return manifest


def manifest_digest(manifest):
    """sha256 (hex) of what a manifest says the data is: each shard's name, split, token count and sha256, and
    the tokenizer. The same data prepared again, or moved to another folder, has the same digest."""
    shards = sorted(([s["split"], s["name"], s["tokens"], s.get("sha256")] for s in manifest["shards"]), key=repr)
    identity = {"tokenizer": manifest.get("tokenizer"), "dtype": manifest.get("dtype", "uint16"), "shards": shards}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def split_shards(manifest, data_dir, split):
    shards = [s for s in manifest["shards"] if s["split"] == split]
    if not shards:
        raise DataError(f"no '{split}' shards in '{data_dir}/manifest.json': re-run data/prepare.py.")
    return shards


def split_tokens(data_dir):
    """{'train': tokens, 'val': tokens} of a data_dir whose shards are all present and of their listed length
    (what a run checks at start, but the sha256: --dry_run reads no shard through)."""
    manifest = read_manifest(data_dir)
    return {split: sum(open_shard(data_dir, shard).size for shard in split_shards(manifest, data_dir, split))
            for split in ("train", "val")}


def open_shard(data_dir, shard):
    """Memory-map one shard and check that its length matches the manifest."""
    path = os.path.join(data_dir, shard["name"])
    if not os.path.isfile(path):
        raise DataError(f"shard '{path}' listed in manifest.json is missing: re-run data/prepare.py.")
    try:
        tokens = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise DataError(f"shard '{path}' is truncated or unreadable ({e}): re-run data/prepare.py.") from None
    if tokens.dtype != np.uint16 or tokens.ndim != 1 or tokens.size != shard["tokens"]:
        raise DataError(
            f"shard '{path}' holds {tokens.size} {tokens.dtype} tokens, manifest.json says {shard['tokens']} "
            f"uint16: it is truncated or from another run; re-run data/prepare.py."
        )
    return tokens


def shard_stamp(path):
    """(inode, size, mtime): the same inode with another size or mtime is a file written in place."""
    stat = os.stat(path)
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


VERIFIED_FILE = ".verified.json"  # sha256 already checked, per shard, with the size and mtime it had then


def verify_hashes(data_dir, shards):
    """Check each shard's sha256 against the manifest; return the bytes hashed (0 when all were cached).

    Hashing reads every byte (seconds per GB), so a shard whose size and mtime are those it had when it was
    last checked is not hashed again; the record is kept in data_dir when it is writable.
    """
    cache_path = os.path.join(data_dir, VERIFIED_FILE)
    try:
        with open(cache_path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    hashed = 0
    for shard in shards:
        if "sha256" not in shard:
            continue  # a manifest written by other tools may carry no hashes
        path = os.path.join(data_dir, shard["name"])
        stat = os.stat(path)
        stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": shard["sha256"]}
        if cache.get(shard["name"]) == stamp:
            continue
        if sha256_of(path) != shard["sha256"]:
            raise DataError(f"shard '{path}' does not match the sha256 in manifest.json: it is corrupt or from "
                            f"another run; re-run data/prepare.py (python data/prepare.py --verify {data_dir} "
                            f"checks every shard).")
        cache[shard["name"]] = stamp
        hashed += stat.st_size
    if hashed:
        try:
            atomic_write(cache_path, lambda f: f.write(json.dumps(cache).encode()))
        except OSError:
            pass  # a read-only data folder (or another rank renamed the same record first): hashed again next time
    return hashed


class DataLoader:
    def __init__(self, data_dir, split, batch_size, block_size, rank=0, world_size=1, seed=1337,
                 shuffle=True, device="cpu", vocab_size=None):
        manifest = read_manifest(data_dir)
        self.manifest_digest = manifest_digest(manifest)  # the data's identity, kept in checkpoints
        self.manifest_shards = {s["name"]: s for s in manifest["shards"]}  # what the ranks compare before step 0
        shards = split_shards(manifest, data_dir, split)
        self.tokens = [open_shard(data_dir, s) for s in shards]
        self.paths = [os.path.join(data_dir, s["name"]) for s in shards]
        self.stamps = [shard_stamp(path) for path in self.paths]  # before hashing: a later change is seen
        self.hashed_bytes = verify_hashes(data_dir, shards)
        self.names = [s["name"] for s in shards]
        self.batch_size, self.block_size = batch_size, block_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.vocab_size = vocab_size  # token ids at or beyond it are refused (an embedding would fail on them)
        self.device = torch.device(device)
        # windows never cross a shard boundary; a shard's last partial window is dropped
        self.windows_per_shard = [(t.size - 1) // block_size for t in self.tokens]
        self.windows_per_epoch = sum(self.windows_per_shard)
        if self.windows_per_epoch == 0:
            longest = max(t.size for t in self.tokens)
            raise DataError(
                f"block_size {block_size} is longer than the '{split}' data in '{data_dir}' (longest shard: "
                f"{longest} tokens): lower --block_size or prepare more data."
            )
        self.position = 0  # index of the next window in the endless stream of epochs
        self._order_cache = {}
        self._perm_cache = {}
        self._prefetched = None  # (position, batch): the next batch, read ahead
        self._copy_stream = None  # CUDA only: host-to-device copies off the compute stream

    def _epoch_order(self, epoch):
        """Shard order and cumulative window counts for one epoch."""
        if epoch not in self._order_cache:
            order = np.arange(len(self.tokens))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(order)
            counts = np.array([self.windows_per_shard[i] for i in order])
            self._order_cache = {epoch: (order, np.cumsum(counts))}
        return self._order_cache[epoch]

    def _window_start(self, index):
        """Token offset and shard of window `index` of the stream."""
        epoch, within = divmod(index, self.windows_per_epoch)
        order, ends = self._epoch_order(epoch)
        slot = int(np.searchsorted(ends, within, side="right"))
        shard = int(order[slot])
        window = within - (int(ends[slot - 1]) if slot else 0)
        if self.shuffle:
            window = int(self._window_order(epoch, shard)[window])
        return shard, window * self.block_size

    def _window_order(self, epoch, shard):
        """A permutation of one shard's windows (int32: 0.4 MB for a 1e8-token shard), cached briefly."""
        key = (epoch, shard)
        if key not in self._perm_cache:
            if len(self._perm_cache) >= 4:
                self._perm_cache.pop(next(iter(self._perm_cache)))
            rng = np.random.default_rng([self.seed, epoch, shard])
            self._perm_cache[key] = rng.permutation(self.windows_per_shard[shard]).astype(np.int32)
        return self._perm_cache[key]

    def _host_rows(self, indices):
        """(x, y) of the windows `indices` of the stream, int64 on the CPU."""
        rows, touched = [], set()
        for index in indices:
            shard, start = self._window_start(index)
            touched.add(shard)
            rows.append((shard, start))
        for shard in touched:
            self._check_unchanged(shard)
        rows = [self.tokens[shard][start:start + self.block_size + 1] for shard, start in rows]
        buf = np.stack(rows)  # (B, T + 1) uint16: the only copy out of the memory map
        if self.vocab_size is not None and int(buf.max()) >= self.vocab_size:
            raise DataError(f"the data in '{os.path.dirname(self.paths[0])}' holds token id {int(buf.max())}, beyond "
                            f"--vocab_size={self.vocab_size}: raise vocab_size to the tokenizer's (50304 for GPT-2).")
        # int64 conversion in numpy, one thread: torch's parallel copy stalls when the cores are busy training
        return torch.from_numpy(buf[:, :-1].astype(np.int64)), torch.from_numpy(buf[:, 1:].astype(np.int64))

    def _read(self, position):
        """This rank's (x, y) at `position` of the stream, int64 on the CPU (pinned when bound for a GPU)."""
        first = position + self.rank * self.batch_size
        x, y = self._host_rows(range(first, first + self.batch_size))
        if self.device.type != "cuda":
            return x.to(self.device), y.to(self.device)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=self.device)
        with torch.cuda.stream(self._copy_stream):  # the copy runs beside the step's kernels, not between them
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)

    def next_batch(self):
        """(x, y) of shape (batch_size, block_size), int64, on the device; this rank's part of the batch.

        The batch after it is read and, on a GPU, copied on a side stream at once, so the copy overlaps the
        step that uses this one. The prefetch is keyed by position: setting `position` (eval, resume)
        discards it, and state_dict() is the position of the next batch handed out, not the one read ahead."""
        if self._prefetched is None or self._prefetched[0] != self.position:
            self._prefetched = (self.position, self._read(self.position))
        x, y = self._prefetched[1]
        if self._copy_stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._copy_stream)
            x.record_stream(current)  # the caching allocator must not reuse them while the step still reads them
            y.record_stream(current)
        self.position += self.batch_size * self.world_size
        self._prefetched = (self.position, self._read(self.position))
        return x, y

    def _check_unchanged(self, shard):
        """A shard written in place under the running job is refused before its pages are read (reading past a
        truncated end would kill the process with SIGBUS). A shard deleted or replaced through a rename is
        harmless: the memory map keeps the checked file."""
        try:
            stamp = shard_stamp(self.paths[shard])
        except FileNotFoundError:
            return
        if stamp[0] == self.stamps[shard][0] and stamp != self.stamps[shard]:
            raise DataError(f"shard '{self.paths[shard]}' was changed in place while training: its data is no longer "
                            f"what was checked. Restore it (python data/prepare.py), then continue with "
                            f"--resume=auto from the last checkpoint.")

    def spread_windows(self, count=None):
        """`count` window indices spaced evenly over the first epoch (all of them when count is None or
        larger): a fixed sample of the whole split, not of its start."""
        if count is None or count >= self.windows_per_epoch:
            return np.arange(self.windows_per_epoch)
        return np.arange(count) * self.windows_per_epoch // count

    def windows(self, indices, rows):
        """(x, y) of the windows `indices` (at most `rows`) on the device, padded to `rows` rows whose targets
        are -1 (ignored by the loss): every call has the same shapes, for torch.compile and fsdp's collectives."""
        x = torch.zeros((rows, self.block_size), dtype=torch.long)
        y = torch.full((rows, self.block_size), -1, dtype=torch.long)
        if len(indices):
            x[:len(indices)], y[:len(indices)] = self._host_rows(indices)
        return x.to(self.device), y.to(self.device)

    def state_dict(self):
        return {"position": self.position, "seed": self.seed, "shuffle": self.shuffle, "shards": self.names,
                "block_size": self.block_size}

    def load_state_dict(self, state):
        if state["shards"] != self.names or state["block_size"] != self.block_size:
            raise DataError("the checkpoint's loader state is for other shards or another block_size: "
                            "resume with the data and block_size the run started with.")
        self.position = state["position"]

