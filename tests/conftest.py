"""Shared fixtures and helpers: a tiny model config, small token shards made in tmp_path, processes started,
waited on and stopped, and a few HellaSwag examples. Test files import helpers from here, not from each other."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# one compute thread a process: `make test` runs two pytest workers, and most tests start processes of their
# own (torchrun ranks), so a process that took every core would only fight the others for them. Set before
# torch starts its thread pool here, and inherited by every subprocess a test starts
os.environ["OMP_NUM_THREADS"] = "1"

from data.shards import write_shard  # noqa: E402

TINY_MODEL = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32"]
# tiny_args' vocab: the test tokens are < 64, and at GPT-2's 50304 the output head is most of a tiny step. A test
# that uses the GPT-2 tokenizer (a sample, a prompt, HellaSwag text, an HF export) passes FULL_VOCAB after it
# (the last flag wins)
SMALL_VOCAB = "--vocab_size=128"
FULL_VOCAB = "--vocab_size=50304"


def pytest_collection_modifyitems(items):
    """The `slow` tests (processes of their own, tens of seconds) first: spread over the workers from the
    start, the quick ones then fill the gaps, and no long test is left to run alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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
    """Flags for a fast CPU run of a tiny model with a small vocab."""
    return TINY_MODEL + [SMALL_VOCAB,
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


def torchrun(nproc, script, args, env=None, timeout=240):
    """`torchrun --standalone --nproc_per_node=nproc script args` through run_python."""
    return run_python(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args],
                      timeout=timeout, env=env)


# runs signalled mid-way: start one, wait for a file it writes, kill it or stop it, finish it

RESUME_ARGS = ["--max_steps=8", "--checkpoint_interval=3", "--dropout=0.1"]
DELAY = {"GPT2_DEBUG_STEP_DELAY": "0.3"}  # slow steps, so the test can signal a run mid-way


def start(command, env=None, cwd=ROOT):
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen(command, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(process, timeout=120):
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def wait_for(condition, process, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended early:\n{process.communicate()[0]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def workers(torchrun_pid):
    """{rank: pid} of torchrun's workers (children of torchrun, each in its own session)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = dict(item.partition(b"=")[::2] for item in f.read().split(b"\0") if item)
        except OSError:
            continue
        if parent == torchrun_pid and b"RANK" in environ:
            found[int(environ[b"RANK"])] = int(pid)
    return found


def curve(out_dir):
    """([(step, loss)], [val_loss]) of a run, checked to read as one run."""
    metrics = read_metrics(out_dir)
    steps = [m["step"] for m in metrics]
    assert steps == sorted(steps), "metrics.jsonl must read as one run"
    return [(m["step"], m["loss"]) for m in metrics if "loss" in m], [m["val_loss"] for m in metrics if "val_loss" in m]


# three HellaSwag validation examples, in the official format's fields that the scorer reads

EXAMPLES = [
    {"ctx": "A man is sitting on a roof. He", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"ctx": "A woman is outside with a bucket and a dog. The dog is running around trying to avoid a bath. She",
     "label": 2, "endings": ["rinses the bucket off with soap and blow dry the dog's head.",
                             "uses a hose to keep it from getting soapy.", "gets the dog wet, then it runs away again.",
                             "gets into a bath tub with the dog."]},
    {"ctx": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes smiles.",
     "label": 0, "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift.",
                             ", the man puts on a christmas coat, knitted with netting.",
                             ", the man continues removing the snow on his car."]},
]


def write_examples(path, examples=EXAMPLES):
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return str(path)
