"""The loader: memory-mapped, disjoint across ranks, no repeats in an epoch, the same global batch whatever the
world size and micro-batch size, and exact continuation from its state."""

import json

import numpy as np
import pytest
import torch

from data.loader import DataLoader
from data.shards import write_shard

BLOCK = 16


@pytest.fixture
def numbered_dir(tmp_path):
    """Two train shards whose token values are unique positions, so a window's first token names it."""
    shards = [dict(write_shard(str(tmp_path), "val_000000.npy", np.arange(0, 500, dtype=np.uint16)), split="val")]
    shards.append(dict(write_shard(str(tmp_path), "train_000001.npy", np.arange(1000, 1000 + 1601, dtype=np.uint16)),
                       split="train"))
    shards.append(dict(write_shard(str(tmp_path), "train_000002.npy", np.arange(5000, 5000 + 961, dtype=np.uint16)),
                       split="train"))
    with open(tmp_path / "manifest.json", "w") as f:
        json.dump({"source": "test", "tokenizer": "gpt2", "dtype": "uint16", "shards": shards}, f)
    return str(tmp_path)


def window_ids(x):
    return [int(v) for v in x[:, 0]]


def step_windows(data_dir, world_size, batch_size, steps, windows_per_step, shuffle=True):
    """The set of windows of each optimizer step, gathered over every rank and micro-step."""
    loaders = [DataLoader(data_dir, "train", batch_size, BLOCK, rank, world_size, seed=7, shuffle=shuffle)
               for rank in range(world_size)]
    micro_steps = windows_per_step // (batch_size * world_size)
    result = []
    for _ in range(steps):
        ids = []
        for _ in range(micro_steps):
            for loader in loaders:
                ids += window_ids(loader.next_batch()[0])
        result.append(sorted(ids))
    return result


def test_windows_are_memory_mapped_int64_pairs(numbered_dir):
    loader = DataLoader(numbered_dir, "train", 4, BLOCK)
    assert all(isinstance(t, np.memmap) for t in loader.tokens)
    x, y = loader.next_batch()
    assert x.dtype == torch.int64 and x.shape == (4, BLOCK)
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)


def test_no_window_repeats_within_an_epoch(numbered_dir):
    loader = DataLoader(numbered_dir, "train", 4, BLOCK, seed=3)
    assert loader.windows_per_epoch == 1600 // BLOCK + 960 // BLOCK
    seen = []
    while len(seen) < loader.windows_per_epoch:
        seen += window_ids(loader.next_batch()[0])
    first_epoch = seen[: loader.windows_per_epoch]
    assert len(set(first_epoch)) == loader.windows_per_epoch
    assert all((w - 1000) % BLOCK == 0 or (w - 5000) % BLOCK == 0 for w in first_epoch)
    assert first_epoch != sorted(first_epoch)  # shuffled...
    sequential = DataLoader(numbered_dir, "train", 4, BLOCK, shuffle=False)
    ids = window_ids(sequential.next_batch()[0]) + window_ids(sequential.next_batch()[0])
    assert ids == [1000 + i * BLOCK for i in range(8)]  # ...unless asked not to be


def test_ranks_read_disjoint_windows(numbered_dir):
    loaders = [DataLoader(numbered_dir, "train", 3, BLOCK, rank, 4, seed=1) for rank in range(4)]
    for _ in range(5):
        ids = [window_ids(loader.next_batch()[0]) for loader in loaders]
        flat = [w for part in ids for w in part]
        assert len(flat) == len(set(flat)) == 12


def test_same_global_batch_for_any_world_size_and_micro_batch(numbered_dir):
    reference = step_windows(numbered_dir, 1, 8, steps=6, windows_per_step=16)
    for world_size, batch_size in ((2, 8), (4, 4), (2, 2), (1, 4)):
        assert step_windows(numbered_dir, world_size, batch_size, steps=6, windows_per_step=16) == reference


def test_state_dict_continues_at_exactly_the_next_window(numbered_dir):
    uninterrupted = DataLoader(numbered_dir, "train", 5, BLOCK, 1, 2, seed=11)
    for _ in range(30):  # past the end of the first epoch
        uninterrupted.next_batch()
    state = json.loads(json.dumps(uninterrupted.state_dict()))  # plain data, as in a checkpoint
    resumed = DataLoader(numbered_dir, "train", 5, BLOCK, 1, 2, seed=11)
    resumed.load_state_dict(state)
    for _ in range(10):
        a, b = uninterrupted.next_batch(), resumed.next_batch()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_setting_the_position_discards_the_batch_read_ahead(numbered_dir):
    loader = DataLoader(numbered_dir, "train", 4, BLOCK, seed=5)
    first = [window_ids(loader.next_batch()[0]) for _ in range(3)]
    assert loader.state_dict()["position"] == 12  # the batch read ahead is not counted
    loader.position = 0  # as load_state_dict() sets it on resume
    assert [window_ids(loader.next_batch()[0]) for _ in range(3)] == first


def test_state_of_other_data_is_refused(numbered_dir):
    from data.loader import DataError

    state = DataLoader(numbered_dir, "train", 4, BLOCK).state_dict()
    with pytest.raises(DataError, match="block_size"):
        DataLoader(numbered_dir, "train", 4, 2 * BLOCK).load_state_dict(state)


def test_shard_hashes_are_checked_once_until_a_shard_changes(numbered_dir):
    from data.loader import DataError

    first = DataLoader(numbered_dir, "train", 4, BLOCK)
    assert first.hashed_bytes > 0
    assert DataLoader(numbered_dir, "train", 4, BLOCK).hashed_bytes == 0  # unchanged shards: the record holds
    path = f"{numbered_dir}/train_000002.npy"
    tokens = np.load(path)
    tokens[-1] += 1  # same size, other content
    np.save(path, tokens)
    with pytest.raises(DataError, match="train_000002.npy.*sha256"):
        DataLoader(numbered_dir, "train", 4, BLOCK)
