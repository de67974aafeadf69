"""Shared fixtures: a tiny model config and small token shards made in tmp_path."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data.shards import write_shard  # noqa: E402

TINY_MODEL = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32"]


def make_token_shards(data_dir, n_train_shards=2, train_tokens=6000, val_tokens=3000, seed=0):
    """Shards of a learnable sequence (a noisy counting pattern over 64 ids) plus manifest.json."""
    os.makedirs(data_dir, exist_ok=True)
    rng = np.random.default_rng(seed)

    def tokens(n):
        base = np.arange(n) % 64
        noise = rng.integers(0, 64, n)
        return np.where(rng.random(n) < 0.1, noise, base).astype(np.uint16)

    shards = [dict(write_shard(data_dir, "tiny_val_000000.npy", tokens(val_tokens)), split="val")]
    for i in range(n_train_shards):
        shards.append(dict(write_shard(data_dir, f"tiny_train_{i + 1:06d}.npy", tokens(train_tokens)), split="train"))
    with open(os.path.join(data_dir, "manifest.json"), "w") as f:
        json.dump({"source": "test", "tokenizer": "gpt2", "dtype": "uint16", "shards": shards}, f)
    return data_dir


@pytest.fixture
def token_dir(tmp_path):
    return make_token_shards(str(tmp_path / "tokens"))


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """W&B writing into tmp_path, with no wandb service left over from another test (nor for the next)."""
    import wandb

    wandb.teardown()
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    yield
    wandb.teardown()


def tiny_args(data_dir, out_dir, *extra):
    """Flags for a fast CPU run of a tiny model."""
    return TINY_MODEL + [
        f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--device=cpu", "--wandb_mode=disabled",
        "--batch_size=4", "--total_batch_size=256", "--max_steps=4", "--warmup_steps=2",
        "--learning_rate=1e-3", "--min_lr=1e-4", "--eval_interval=2", "--eval_iters=2", "--sample_tokens=0",
        *extra,
    ]


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_python(args, timeout=300, env=None):
    """Run a command with the test interpreter from the repository root."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def child_pids(pid):
    """The processes `pid` started (Linux /proc; none where it is missing)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except OSError:
        return []


def run_bounded(args, timeout, env=None):
    """run_python for a job that may hang, torchrun and its workers: past `timeout` seconds every worker's
    process group and then the launcher's are killed, and returncode is None. (subprocess.run would kill
    torchrun alone, and its workers, each in a session of its own, would wait for the process-group timeout.)"""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=full_env, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    except subprocess.TimeoutExpired:
        for group in [*child_pids(process.pid), process.pid]:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stdout, stderr = process.communicate()
        return subprocess.CompletedProcess(process.args, None, stdout, stderr)


def torchrun_bounded(nproc, script, args, timeout, env=None):
    """`torchrun --standalone --nproc_per_node=nproc script args` through run_bounded."""
    return run_bounded(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args],
                       timeout, env)
