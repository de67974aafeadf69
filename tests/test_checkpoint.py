"""Checkpoint contents, atomic writes, broken and mismatched checkpoints, pruning, the NaN guard, sample.py."""

import math
import os
import struct
import zipfile

import pytest
import torch

import train
from gpt2_pretrain.atomic import atomic_save
from gpt2_pretrain.checkpoint.checkpointer import Checkpointer
from gpt2_pretrain.checkpoint.files import list_checkpoints, model_weights, try_load
from gpt2_pretrain.distributed import DistInfo
from model import GPT, GPTConfig
from scripts import sample
from tests.conftest import FULL_VOCAB, make_token_shards, read_metrics, run_python, tiny_args


def run(token_dir, out, *extra):
    train.main(tiny_args(token_dir, str(out), *extra))
    return str(out)


def losses(out_dir):
    return {m["step"]: m["loss"] for m in read_metrics(out_dir) if "loss" in m}


def files(out_dir):
    return sorted(n for n in os.listdir(out_dir) if n.endswith(".pt") or ".tmp." in n)


def test_checkpoint_holds_the_whole_state_as_plain_data(token_dir, tmp_path):
    out = run(token_dir, tmp_path / "run", "--max_steps=3", "--compile=false")
    checkpoint = torch.load(os.path.join(out, "ckpt_000003.pt"), weights_only=True)
    assert checkpoint["step"] == 3 and checkpoint["world_size"] == 1
    assert checkpoint["config"]["n_embd"] == 32 and checkpoint["config"]["max_steps"] == 3
    assert set(checkpoint["model"]) == set(GPT(GPTConfig(vocab_size=128, block_size=32, n_layer=2, n_head=2,
                                                         n_embd=32)).state_dict())
    assert len(checkpoint["optimizers"]) == 1 and checkpoint["optimizers"][0]["state"]
    (rank,) = checkpoint["ranks"]
    assert set(rank["rng"]) >= {"python", "numpy", "torch"}
    assert rank["loader"]["position"] == 3 * 256 // 32  # 3 steps of 256 tokens in 32-token windows
    assert checkpoint["best_val_loss"] < 10 and checkpoint["nonfinite_steps"] == 0
    assert "wandb_run_id" in checkpoint


def test_failed_save_leaves_the_previous_file_intact(tmp_path):
    class DiskFull:
        def __reduce__(self):
            raise OSError(28, "No space left on device")

    path = str(tmp_path / "ckpt_000001.pt")
    atomic_save({"step": 1}, path)
    with pytest.raises(OSError):
        atomic_save({"step": 2, "boom": DiskFull()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["ckpt_000001.pt"]


def test_truncated_latest_checkpoint_falls_back_to_the_previous(token_dir, tmp_path, capsys):
    out = run(token_dir, tmp_path / "run", "--checkpoint_interval=2", "--keep_last=0")
    reference = losses(out)
    latest = os.path.join(out, "ckpt_000004.pt")
    size = os.path.getsize(latest)
    with open(latest, "r+b") as f:
        f.truncate(size // 2)  # also truncates best_000004.pt, a hard link to the same file
    capsys.readouterr()
    run(token_dir, out, "--checkpoint_interval=2", "--keep_last=0")
    printed = capsys.readouterr().out
    assert "ckpt_000004.pt is unusable" in printed
    assert f"resumed from {os.path.join(out, 'ckpt_000002.pt')} at step 2" in printed
    assert losses(out) == reference  # steps 2 and 3 ran again, identically
    assert torch.load(latest, weights_only=True)["step"] == 4  # rewritten whole


def test_another_model_is_refused_and_harmless_overrides_are_reported(token_dir, tmp_path, capsys):
    out = run(token_dir, tmp_path / "run", "--max_steps=2")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(token_dir, out, "--max_steps=2", "--n_embd=64", "--n_layer=3")
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "n_embd: 32 in the checkpoint, 64 requested" in error and "n_layer: 2 in the checkpoint, 3" in error
    assert "max_steps" not in error
    run(token_dir, out, "--max_steps=3")
    printed = capsys.readouterr().out
    assert "max_steps: 2 -> 3" in printed and "resumed from" in printed
    assert sorted(losses(out)) == [0, 1, 2]
    with pytest.raises(SystemExit):
        run(token_dir, out, "--max_steps=3", "--resume=never")
    assert "already holds checkpoints" in capsys.readouterr().err


def test_keep_last_prunes_old_checkpoints_and_keeps_the_best(token_dir, tmp_path):
    # val loss falls for 6 steps, then a resumed run with a huge learning rate makes it rise: the best
    # checkpoint is not the latest, whatever the rounding of the loss (no chaotic trajectory to rely on)
    common = ["--checkpoint_interval=1", "--keep_last=2", "--eval_interval=3", "--warmup_steps=0", "--grad_clip=0"]
    out = run(token_dir, tmp_path / "run", "--max_steps=6", "--learning_rate=1e-2", "--min_lr=1e-2", *common)
    run(token_dir, out, "--max_steps=12", "--learning_rate=50", "--min_lr=50", *common)
    val = {m["step"]: m["val_loss"] for m in read_metrics(out) if "val_loss" in m}
    best_step = min((s for s in val if s > 0), key=val.get)
    assert best_step == 6 and val[6] < val[3] < val[0] and min(val[9], val[12]) > val[6]
    # ckpt_000006.pt too: the second run started from it, and a run never prunes its own starting point
    assert files(out) == sorted(["ckpt_000006.pt", "ckpt_000011.pt", "ckpt_000012.pt", f"best_{best_step:06d}.pt"])
    best = torch.load(os.path.join(out, f"best_{best_step:06d}.pt"), weights_only=True)
    # like every checkpoint at step s, it holds the state before step s's evaluation
    assert best["step"] == best_step and best["best_val_loss"] == min(val[s] for s in val if 0 < s < best_step)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_nan_loss_skips_the_update_and_is_counted(token_dir, tmp_path, monkeypatch, optimizer):
    """Skipped on the device (fused AdamW's found_inf; Muon's step undone), the flag read at the next log."""
    monkeypatch.setenv("GPT2_DEBUG_NAN_STEPS", "2")
    out = run(token_dir, tmp_path / "run", "--checkpoint_interval=1", "--keep_last=0", f"--optimizer={optimizer}")
    metrics = read_metrics(out)
    assert [m for m in metrics if "nonfinite_steps" in m] == [{"step": 2, "nonfinite_steps": 1}]
    assert losses(out)[2] is None and math.isfinite(losses(out)[3])
    before, after = (torch.load(os.path.join(out, f"ckpt_{s:06d}.pt"), weights_only=True) for s in (2, 3))
    for name, tensor in before["model"].items():
        assert torch.equal(tensor, after["model"][name]), name  # the NaN step changed nothing
    for old, new in zip(before["optimizers"], after["optimizers"], strict=True):
        for index, state in old["state"].items():
            for key, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(new["state"][index][key])), (index, key)
    assert after["nonfinite_steps"] == 1


def test_repeated_nans_stop_the_run_without_a_nan_checkpoint(token_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPT2_DEBUG_NAN_STEPS", "2,3,4,5")
    with pytest.raises(SystemExit) as exit_info:
        run(token_dir, tmp_path / "run", "--max_steps=8", "--checkpoint_interval=1", "--max_nonfinite_steps=3")
    assert exit_info.value.code == 2
    assert "3 steps in a row (up to step 4) had a non-finite loss" in capsys.readouterr().err
    saved = list_checkpoints(str(tmp_path / "run"))
    assert saved[0][0] == 4  # state before step 4, after the skipped steps 2 and 3
    for _, path in saved:
        model = torch.load(path, weights_only=True)["model"]
        assert all(torch.isfinite(t).all() for t in model.values())


def test_a_non_finite_model_is_never_saved(token_dir, tmp_path):
    config = train.load_config(tiny_args(token_dir, str(tmp_path / "run")))
    model = GPT(train.model_config(config))
    optimizer = torch.optim.AdamW(model.parameters())
    loader = train.DataLoader(token_dir, "train", batch_size=4, block_size=32)
    checkpoints = Checkpointer(config, DistInfo(), model, [optimizer], loader)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    checkpoints.save(5, final=False, counters={"nonfinite_steps": 0, "wandb_run_id": None})
    assert not os.path.exists(str(tmp_path / "run" / "ckpt_000005.pt"))


@pytest.mark.slow  # starts a Python process that imports torch: about 4 s each on the 2-core box
def test_sample_script_generates_from_a_checkpoint(token_dir, tmp_path):
    out = str(tmp_path / "run")
    train.main(tiny_args(token_dir, out, FULL_VOCAB, "--max_steps=1"))  # the full GPT-2 vocab, so any prompt encodes
    result = run_python(["scripts/sample.py", out, "--prompt=Hello", "--tokens=5", "--temperature=0.8",
                         "--top_k=10", "--num_samples=2"])
    assert result.returncode == 0, result.stderr
    assert "ckpt_000001.pt (step 1" in result.stderr
    assert result.stdout.count("Hello") == 2


def test_resumed_run_continues_the_same_wandb_run(token_dir, tmp_path, wandb_env):
    out = run(token_dir, tmp_path / "run", "--max_steps=2", "--wandb_mode=offline")
    run(token_dir, out, "--max_steps=3", "--wandb_mode=offline")
    first, second = (torch.load(os.path.join(out, f"ckpt_{s:06d}.pt"), weights_only=True) for s in (2, 3))
    assert first["wandb_run_id"] and second["wandb_run_id"] == first["wandb_run_id"]


def snapshot(out_dir):
    """{relative path: bytes} of every file under out_dir but the lock, which names the last run."""
    found = {}
    for folder, _, names in os.walk(out_dir):
        for name in set(names) - {".lock"}:
            with open(os.path.join(folder, name), "rb") as f:
                found[os.path.relpath(os.path.join(folder, name), out_dir)] = f.read()
    return found


def zero_middle(path, size=4096):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(size))


def zero_inside_a_tensor(path, size=4096):
    """Zero bytes in the middle of the largest tensor's data: the zip and the pickle stay readable."""
    with zipfile.ZipFile(path) as archive:
        entry = max((e for e in archive.infolist() if "/data/" in e.filename), key=lambda e: e.file_size)
    with open(path, "r+b") as f:
        f.seek(entry.header_offset + 26)  # the local header's name and extra-field lengths
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        f.seek(entry.header_offset + 30 + name_length + extra_length + (entry.file_size - size) // 2)
        f.write(bytes(size))


def test_no_usable_checkpoint_stops_the_run_and_keeps_every_file(token_dir, tmp_path, capsys):
    # the old code started over at step 0 here and pruned the damaged checkpoint away
    out = run(token_dir, tmp_path / "run", "--checkpoint_interval=2", "--keep_last=1")
    assert files(out) == ["best_000004.pt", "ckpt_000004.pt"]  # one file: best_ is a hard link
    with open(os.path.join(out, "ckpt_000004.pt"), "r+b") as f:
        f.truncate(1000)
    before = snapshot(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(token_dir, out, "--checkpoint_interval=2", "--keep_last=1", "--max_steps=6")
    assert exit_info.value.code == 2
    printed = capsys.readouterr()
    error = printed.err
    assert "falling back" not in printed.out  # there is nothing to fall back to
    assert error.count("\n") == 1 and "holds checkpoints but none is usable (ckpt_000004.pt: " in error
    assert "--resume=PATH" in error and "--resume=never" in error
    assert snapshot(out) == before  # metrics.jsonl untouched too
    # starting over on purpose keeps the damaged files, set aside
    run(token_dir, out, "--checkpoint_interval=2", "--keep_last=1", "--resume=never")
    (aside,) = os.listdir(os.path.join(out, "set_aside"))
    kept = snapshot(os.path.join(out, "set_aside", aside))
    assert kept["ckpt_000004.pt"] == before["ckpt_000004.pt"] and kept["metrics.jsonl"] == before["metrics.jsonl"]


def test_changed_bytes_make_a_checkpoint_unusable(token_dir, tmp_path, capsys):
    # the old code loaded a checkpoint with 4 KB zeroed in the middle (inside a tensor) without noticing
    out = run(token_dir, tmp_path / "run", "--checkpoint_interval=2", "--keep_last=0", "--keep_best=false")
    reference = losses(out)
    latest = os.path.join(out, "ckpt_000004.pt")
    zero_inside_a_tensor(latest)
    checkpoint, problem = try_load(latest)
    assert checkpoint is None and "does not match its checksum" in problem
    with pytest.raises(SystemExit):  # sample.py, eval.py and export_hf.py load through try_load too
        sample.main([latest, "--tokens=1"])
    assert f"checkpoint {latest} is unusable (its content does not match its checksum" in capsys.readouterr().err
    damaged = snapshot(out)["ckpt_000004.pt"]
    capsys.readouterr()
    run(token_dir, out, "--checkpoint_interval=2", "--keep_last=0", "--keep_best=false")
    printed = capsys.readouterr().out
    assert "ckpt_000004.pt is unusable (its content does not match its checksum" in printed
    assert f"resumed from {os.path.join(out, 'ckpt_000002.pt')} at step 2" in printed
    assert losses(out) == reference
    (aside,) = os.listdir(os.path.join(out, "set_aside"))  # the damaged file is kept, out of the way
    assert snapshot(os.path.join(out, "set_aside", aside))["ckpt_000004.pt"] == damaged
    assert try_load(latest)[0]["step"] == 4  # written anew


def test_pruning_counts_only_usable_checkpoints_and_spares_the_start(token_dir, tmp_path):
    common = ["--checkpoint_interval=2", "--keep_last=1", "--keep_best=false"]
    out = run(token_dir, tmp_path / "run", "--keep_last=0", "--checkpoint_interval=2", "--keep_best=false")
    zero_middle(os.path.join(out, "ckpt_000002.pt"))
    run(token_dir, out, *common, "--max_steps=8")
    # ckpt_000002 is broken: neither counted nor deleted; ckpt_000004 is where the run started
    assert files(out) == ["ckpt_000002.pt", "ckpt_000004.pt", "ckpt_000008.pt"]


def test_a_sharded_checkpoint_checks_each_of_its_files(token_dir, tmp_path):
    out = run(token_dir, tmp_path / "run", "--parallel=fsdp", "--max_steps=2", "--keep_best=false")
    path = os.path.join(out, "ckpt_000002.dcp")
    assert try_load(path)[1] is None
    shard = next(n for n in os.listdir(path) if n.endswith(".distcp"))
    zero_middle(os.path.join(path, shard), size=64)  # the shard file stays readable by DCP
    assert try_load(path)[1] == f"its file {shard} does not match its checksum: it changed after it was written"


def test_a_damaged_sharded_checkpoint_falls_back_to_the_previous_one(token_dir, tmp_path, capsys):
    """A shard cut short in the newest .dcp, whose best_ twin hard-links the same file: both are reported and
    set aside, and the run goes on from the one before with the losses of the run that was never damaged.
    Then a shard missing from the newest ckpt_ alone: its best_ twin of the same step is used."""
    common = ("--parallel=fsdp", "--max_steps=6", "--checkpoint_interval=2", "--keep_last=0")
    out = run(token_dir, tmp_path / "run", *common)
    reference = losses(out)
    newest, twin = os.path.join(out, "ckpt_000006.dcp"), os.path.join(out, "best_000006.dcp")
    (shard,) = [n for n in os.listdir(newest) if n.endswith(".distcp")]
    size = os.path.getsize(os.path.join(newest, shard))
    assert os.path.samefile(os.path.join(newest, shard), os.path.join(twin, shard))
    os.truncate(os.path.join(newest, shard), size // 2)
    cut = f"its file {shard} is {size // 2:,} bytes, {size:,} when written: it was cut or changed"
    assert try_load(newest)[1] == cut and try_load(twin)[1] == cut
    capsys.readouterr()
    run(token_dir, out, *common)
    printed = capsys.readouterr().out
    for path in (newest, twin):
        assert f"warning: checkpoint {path} is unusable ({cut}); falling back to the previous one" in printed
    assert f"resumed from {os.path.join(out, 'ckpt_000004.dcp')} at step 4" in printed
    assert losses(out) == reference  # bit for bit: the same state at step 4, the same batches and random numbers
    (aside,) = os.listdir(os.path.join(out, "set_aside"))
    assert sorted(os.listdir(os.path.join(out, "set_aside", aside))) == ["best_000006.dcp", "ckpt_000006.dcp",
                                                                         "metrics.jsonl"]

    os.remove(os.path.join(newest, shard))  # the run wrote both anew; only ckpt_'s link to the file goes
    run(token_dir, out, *common)
    printed = capsys.readouterr().out
    assert f"warning: checkpoint {newest} is unusable (its file {shard} is missing)" in printed
    assert f"resumed from {twin} at step 6" in printed


def test_a_tied_weight_is_saved_once_in_a_sharded_checkpoint(token_dir, tmp_path):
    """wte and lm_head are one tensor: the .pt file (torch.save keeps a shared storage once) is the reference
    for the size of the .dcp's shards. At GPT-2's vocab wte is most of the model, so a second copy would add a
    third to the shards."""
    common = (FULL_VOCAB, "--max_steps=1", "--eval_iters=1", "--keep_best=false")
    pt = os.path.join(run(token_dir, tmp_path / "ddp", *common), "ckpt_000001.pt")
    dcp = os.path.join(run(token_dir, tmp_path / "fsdp", "--parallel=fsdp", *common), "ckpt_000001.dcp")
    shards = sum(os.path.getsize(os.path.join(dcp, n)) for n in os.listdir(dcp) if n.endswith(".distcp"))
    # DCP frames each of its ~140 tensors (weights, moments, step counts) as a torch.save of its own, under
    # 2 KB each: under 2% of the .pt file's 19.7 MB
    assert shards < 1.02 * os.path.getsize(pt), (shards, os.path.getsize(pt))
    weights = model_weights(dcp, try_load(dcp)[0])  # loadable as before, the tied name filled in
    model = GPT(GPTConfig(vocab_size=50304, block_size=32, n_layer=2, n_head=2, n_embd=32))
    model.load_state_dict(weights)  # strict: every name, lm_head.weight included
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(weights["lm_head.weight"], weights["transformer.wte.weight"])


def test_a_run_is_its_data(token_dir, tmp_path, capsys):
    # the old code printed "config changed" and went on training the first corpus's model on the second
    out = run(token_dir, tmp_path / "run", "--max_steps=2")
    other = make_token_shards(str(tmp_path / "other"), seed=1)  # the same shard names, other tokens
    before = snapshot(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(other, out, "--max_steps=4")
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    latest = os.path.join(out, "ckpt_000002.pt")
    assert error.count("\n") == 1 and f"--data_dir={other} holds other data than {latest}" in error
    assert f"--init_from={latest} --out_dir=ANOTHER_FOLDER" in error
    assert snapshot(out) == before
    # the deliberate way: a new run from the checkpoint's weights; its step-0 val loss is the checkpoint's
    # model evaluated on the same val windows as the first run's step-2 evaluation
    fresh = run(token_dir, tmp_path / "fresh", "--max_steps=1", f"--init_from={latest}")
    val = {m["step"]: m["val_loss"] for m in read_metrics(out) if "val_loss" in m}
    assert read_metrics(fresh)[0] == {"step": 0, "val_loss": val[2]}
    with pytest.raises(SystemExit):
        run(token_dir, tmp_path / "wider", "--max_steps=1", f"--init_from={latest}", "--n_embd=64")
    assert "holds another model shape: n_embd: 32 in the checkpoint, 64 requested" in capsys.readouterr().err


def test_a_checkpoint_written_before_checksums_and_data_digests_still_resumes(token_dir, tmp_path, capsys):
    out = run(token_dir, tmp_path / "run", "--max_steps=2")
    path = os.path.join(out, "ckpt_000002.pt")
    old = {k: v for k, v in torch.load(path, weights_only=True).items() if k not in ("checksum", "data")}
    atomic_save(old, path)  # as the tool wrote it before: nothing to check it against
    assert try_load(path)[1] is None
    capsys.readouterr()
    run(token_dir, out, "--max_steps=3")
    assert f"resumed from {path} at step 2" in capsys.readouterr().out


def test_a_best_checkpoint_that_could_not_be_written_is_not_the_best(tmp_path, monkeypatch, capsys):
    """Disk full at the val loss 1.0 of step 2: no best_000002.pt, so 1.5 at step 4 is still a new best (the
    best on disk), and its file is written once the disk has room."""
    from gpt2_pretrain.checkpoint import checkpointer

    config = train.load_config(tiny_args(str(tmp_path / "data"), str(tmp_path / "out")))
    os.makedirs(config.out_dir)
    model = GPT(train.model_config(config))
    optimizers = train.make_optimizers(config, model, "cpu", log=lambda *args, **kwargs: None)

    class Loader:
        manifest_digest = "sha256 of the data"  # kept in each checkpoint: a run is its data

        def state_dict(self):
            return {"position": 0}

    checkpoints = Checkpointer(config, DistInfo(), model, optimizers, Loader())
    counters = {"nonfinite_steps": 0, "wandb_run_id": None}

    def disk_full(obj, path):
        raise OSError(28, "No space left on device", path)

    with monkeypatch.context() as patch:
        patch.setattr(checkpointer, "atomic_save", disk_full)
        checkpoints.update_best(2, 1.0, counters)
    assert "warning:" in capsys.readouterr().out
    assert checkpoints.best_val_loss == math.inf and not os.listdir(config.out_dir)
    checkpoints.update_best(4, 1.5, counters)
    assert checkpoints.best_val_loss == 1.5 and os.listdir(config.out_dir) == ["best_000004.pt"]
    assert torch.load(os.path.join(config.out_dir, "best_000004.pt"), weights_only=True)["best_val_loss"] == 1.5
