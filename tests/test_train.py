import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from tests.conftest import FULL_VOCAB, make_token_shards, read_metrics, run_python, tiny_args


def final_weights(out_dir, step):
    return torch.load(os.path.join(out_dir, f"ckpt_{step:06d}.pt"), weights_only=True)["model"]


def test_accumulated_micro_batches_equal_one_big_batch(token_dir, tmp_path):
    """4 micro-batches of 2 sequences give the same loss, gradient norm and parameters as 1 batch of 8."""
    runs = {}
    for batch_size in (8, 2):
        out = str(tmp_path / f"bs{batch_size}")
        # the GPT-2 vocab, the one these tolerances were set on: at 128 one embedding entry whose gradient is
        # float32 noise gets a whole AdamW step of either sign in one of the runs (1e-5 apart after 2 steps)
        train.main(tiny_args(token_dir, out, FULL_VOCAB, f"--batch_size={batch_size}", "--max_steps=2",
                             "--eval_interval=100"))
        runs[batch_size] = (read_metrics(out), final_weights(out, 2))
    (metrics_big, weights_big), (metrics_small, weights_small) = runs[8], runs[2]
    steps_big = [m for m in metrics_big if "loss" in m]
    steps_small = [m for m in metrics_small if "loss" in m]
    assert len(steps_big) == len(steps_small) == 2
    for a, b in zip(steps_big, steps_small):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4)
    for name in weights_big:
        torch.testing.assert_close(weights_big[name], weights_small[name], rtol=1e-4, atol=1e-6)


def test_quickstart_smoke_run_loss_falls(token_dir, tmp_path):
    out = str(tmp_path / "run")
    train.main(tiny_args(token_dir, out, "--max_steps=30", "--eval_interval=15", "--warmup_steps=5",
                         "--learning_rate=3e-3", "--sample_tokens=8", FULL_VOCAB))  # samples: the GPT-2 vocab
    metrics = read_metrics(out)
    steps = [m for m in metrics if "loss" in m]
    assert set(steps[0]) >= {"step", "loss", "lr", "grad_norm", "tokens_per_sec"}
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(val) == 3  # steps 0, 15, 30
    assert steps[-1]["loss"] < steps[0]["loss"] - 2.0
    assert val[-1] < val[0] - 2.0
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["max_steps"] == 30 and saved["n_embd"] == 32


@pytest.mark.slow  # starts a Python process that imports torch: about 4 s each on the 2-core box
@pytest.mark.parametrize("extra, message", [
    (["--total_batch_size=100"], "total_batch_size (100) must be a multiple of batch_size * block_size"),
    (["--block_size=8192", "--total_batch_size=32768"], "block_size 8192 is longer than the 'train' data"),
])
def test_bad_runs_exit_with_one_clear_message(token_dir, tmp_path, extra, message):
    result = run_python(["train.py", *tiny_args(token_dir, str(tmp_path / "out"), *extra)])
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # starts a Python process that imports torch: about 4 s each on the 2-core box
def test_data_dir_without_shards_says_how_to_make_them(tmp_path):
    result = run_python(["train.py", f"--data_dir={tmp_path}/empty", f"--out_dir={tmp_path}/out", "--wandb_mode=disabled",
                         "--device=cpu"])
    assert result.returncode == 2
    assert "python data/prepare.py" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow  # starts a Python process that imports torch: about 4 s each on the 2-core box
def test_bare_train_py_points_to_fineweb_preparation(tmp_path):
    result = run_python(["train.py", f"--out_dir={tmp_path}", "--wandb_mode=disabled", "--device=cpu"])
    assert result.returncode == 2
    assert "data/fineweb10B" in result.stderr and "fineweb-edu" in result.stderr.lower()


def test_a_run_refused_at_start_leaves_no_out_dir_it_created(token_dir, tmp_path, monkeypatch):
    """No data: the folders the run made (out_dir and its parent) are removed again, so nothing is left
    for the user to clean before the retry; a folder that existed keeps every file. A run that fails after
    its first metrics line keeps its out_dir."""
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    for out_dir in (existing / "new" / "run", existing):
        with pytest.raises(SystemExit) as exit_info:
            train.main(tiny_args(str(tmp_path / "no_data"), str(out_dir)))
        assert exit_info.value.code == 2
    assert sorted(os.listdir(existing)) == [".lock", "notes.txt"]  # the lock file of the second run only
    assert (existing / "notes.txt").read_text() == "mine"
    monkeypatch.setenv("GPT2_DEBUG_NAN_STEPS", "0")  # the first step fails after step 0's val loss is logged
    failed = tmp_path / "failed" / "run"
    with pytest.raises(SystemExit):
        train.main(tiny_args(token_dir, str(failed), "--max_nonfinite_steps=1"))
    assert "val_loss" in read_metrics(str(failed))[0]  # kept: its out_dir holds what it logged


@pytest.mark.slow  # starts a Python process that imports torch: about 4 s each on the 2-core box
@pytest.mark.parametrize("damage, message", [("remove", "missing"), ("overwrite", "sha256")])
def test_missing_or_corrupt_shard_is_named(tmp_path, damage, message):
    data_dir = make_token_shards(str(tmp_path / "tokens"))
    path = os.path.join(data_dir, "tiny_train_000002.npy")
    if damage == "remove":
        os.remove(path)
    else:
        np.save(path, np.load(path)[::-1].copy())  # same size and dtype: only the hash tells
    result = run_python(["train.py", *tiny_args(data_dir, str(tmp_path / "out"))])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "tiny_train_000002.npy" in result.stderr and message in result.stderr


def test_chunked_loss_trains_like_the_full_logits(token_dir, tmp_path, monkeypatch):
    """The step before the chunked loss (the model's loss as F.cross_entropy over the full logits) and now:
    the same losses step after step, and the same weights at the end."""
    import model
    from gpt2_pretrain import fused_loss

    monkeypatch.setattr(fused_loss, "CPU_CHUNK_ELEMENTS", 2**10)  # 8 rows of 128 a chunk: many chunks a step
    args = ["--vocab_size=128", "--max_steps=6", "--checkpoint_interval=6"]
    chunked = str(tmp_path / "chunked")
    train.main(tiny_args(token_dir, chunked, *args))
    monkeypatch.setattr(model, "linear_cross_entropy",
                        lambda x, w, y, softcap=0.0: F.cross_entropy((x @ w.t()).float().flatten(0, -2), y.flatten(),
                                                        ignore_index=-1))
    full = str(tmp_path / "full")
    train.main(tiny_args(token_dir, full, *args))
    losses = [[m["loss"] for m in read_metrics(out) if "loss" in m] for out in (chunked, full)]
    assert len(losses[0]) == 6 and losses[0] == pytest.approx(losses[1], abs=1e-5)
    for name, tensor in final_weights(chunked, 6).items():
        torch.testing.assert_close(tensor, final_weights(full, 6)[name], atol=1e-5, rtol=1e-4, msg=name)


def test_bench_and_train_run_the_same_step_function():
    from scripts import bench

    assert bench.train_step is train.train_step


def test_samples_are_drawn_without_dropout():
    """With dropout=0.5 the sample is the one of the same weights with dropout off; the model trains on after."""
    from model import GPT

    shape = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--sample_tokens=8"]
    config = train.load_config(shape + ["--dropout=0.5"])
    torch.manual_seed(0)
    model = GPT(train.model_config(config)).train()
    reference = GPT(train.model_config(train.load_config(shape))).eval()
    reference.load_state_dict(model.state_dict())
    assert train.generate_sample(model, config, "cpu", 3) == train.generate_sample(reference, config, "cpu", 3)
    assert model.training


class TargetMean(torch.nn.Module):
    """Stands in for the model: its 'loss' is the mean target id (nan with none), so a val loss is the mean
    of the evaluated targets, which numpy can compute from the shard itself."""

    def forward(self, x, y):
        return None, y[y != -1].double().mean()


@pytest.mark.parametrize("eval_iters", [-1, 2])
def test_val_loss_spreads_over_the_whole_split(tmp_path, eval_iters):
    """Val ids rise from start to end, so the first windows alone would give a low mean. -1 evaluates every
    window; 2 x 4 evaluates 8 spread evenly (window i * W // 8); both the same for 1 or 2 ranks and any batch."""
    from data.loader import DataLoader
    from data.shards import write_shard
    from gpt2_pretrain.distributed import DistInfo

    block, n = 16, 3000
    data_dir = make_token_shards(str(tmp_path / "tokens"))
    ids = (np.arange(n) * 60 // n).astype(np.uint16)
    with open(os.path.join(data_dir, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["shards"][0] = dict(write_shard(data_dir, "tiny_val_000000.npy", ids), split="val")
    with open(os.path.join(data_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    n_windows = (n - 1) // block  # a window is block + 1 tokens, never past the shard's end
    targets = np.stack([ids[w * block + 1:w * block + block + 1] for w in range(n_windows)]).astype(np.float64)
    chosen = range(n_windows) if eval_iters == -1 else [i * n_windows // 8 for i in range(8)]
    expected = targets[list(chosen)].mean()
    for batch_size in ([3, 4] if eval_iters == -1 else [4]):
        config = train.load_config([f"--block_size={block}", f"--batch_size={batch_size}", "--total_batch_size=48",
                                    f"--eval_iters={eval_iters}", "--vocab_size=128", "--sample_tokens=0"])
        for world_size in (1, 2):
            parts = [train.evaluate(TargetMean(), DataLoader(data_dir, "val", batch_size, block, rank, world_size,
                                                             shuffle=False), config,
                                    DistInfo(rank=rank, world_size=world_size))
                     for rank in range(world_size)]  # without a process group each rank returns its share
            # 1e-12: float64 sums of the same numbers in another order
            assert sum(parts) == pytest.approx(expected, rel=1e-12)
    if eval_iters == 2:  # a fair sample of the whole: within half a stride of the ramp (3.75 ids) of its mean
        assert abs(expected - targets.mean()) < 4 and targets[:8].mean() < 2


def test_each_rank_draws_its_own_dropout_masks_from_the_same_initial_weights():
    """train.py's order: seed, build the model, then seed_rank_streams. Ranks 0 and 1 get equal weights and
    different dropout masks, and rank 0's masks are not the draws the weights were made from."""
    from gpt2_pretrain.distributed import seed_rank_streams
    from model import GPT, GPTConfig

    weights, masks = [], []
    for rank in (0, 1):
        torch.manual_seed(1337)
        model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=2, n_embd=16, dropout=0.5))
        seed_rank_streams(1337, rank)
        weights.append(model.state_dict())
        masks.append(model.transformer.drop(torch.ones(1000)) == 0)
    torch.manual_seed(1337)
    after_seed = torch.nn.functional.dropout(torch.ones(1000), 0.5) == 0  # the stream the weights came from
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], after_seed)


def test_steps_too_slow_for_the_stop_grace_are_warned_about(token_dir, tmp_path, monkeypatch, capsys):
    """0.3 s steps (test hook) against --stop_grace=0.2: even one step cannot end within the grace, and the run
    says so with the measured times, once."""
    monkeypatch.setenv("GPT2_DEBUG_STEP_DELAY", "0.3")
    train.main(tiny_args(token_dir, str(tmp_path / "out"), "--max_steps=3", "--stop_grace=0.2"))
    printed = capsys.readouterr().out
    assert printed.count("warning: a stop signal may not reach its checkpoint within --stop_grace=0.2s: a step "
                         "takes 0.") == 1, printed
