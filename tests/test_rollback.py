"""Rollback: --resume=PATH to an older checkpoint starts a new timeline. The newer checkpoints are moved aside
(kept), so a later --resume=auto continues the rollback, not the old timeline; the losses are then those of
a run that never had the old timeline, bit for bit."""

import os

import pytest
import torch

import train
from gpt2_pretrain.guards import StopSignal
from tests.conftest import curve, read_metrics, tiny_args

COMMON = ["--max_steps=8", "--checkpoint_interval=2", "--keep_last=0", "--dropout=0.1"]


def run(token_dir, out, *extra):
    train.main(tiny_args(token_dir, str(out), *COMMON, *extra))
    return str(out)


def test_rollback_is_a_timeline_that_resume_auto_continues(token_dir, tmp_path, monkeypatch, capsys):
    reference = run(token_dir, tmp_path / "reference")
    # the old timeline: a loss spike at step 5 (NaN, its update skipped) makes everything after it differ
    monkeypatch.setenv("GPT2_DEBUG_NAN_STEPS", "5")
    out = run(token_dir, tmp_path / "run")
    monkeypatch.delenv("GPT2_DEBUG_NAN_STEPS")
    old = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out) if name.endswith(".pt")}
    old_metrics = read_metrics(out)
    assert curve(out) != curve(reference)

    # roll back to step 4; this run is stopped at step 6 (as by SIGTERM), where it writes its own ckpt_000006.pt
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(StopSignal, "requested", lambda self, step: step == 6)
        run(token_dir, out, f"--resume={os.path.join(out, 'ckpt_000004.pt')}")
    printed = capsys.readouterr().out
    (aside,) = os.listdir(os.path.join(out, "set_aside"))
    aside = os.path.join(out, "set_aside", aside)
    note = f"new timeline: resumed from {os.path.join(out, 'ckpt_000004.pt')} at step 4; the checkpoints after it " \
           f"(up to step 8) and their metrics were moved into {aside}"
    assert printed.count(note) == 2  # at resume, and again in the summary
    moved = sorted(name for name in old if int(name[5:11]) > 4)
    assert sorted(n for n in os.listdir(aside) if n.endswith(".pt")) == moved
    assert all(open(os.path.join(aside, name), "rb").read() == old[name] for name in moved)  # kept as they were
    assert read_metrics(aside) == [m for m in old_metrics if m["step"] >= 4]
    assert {"step": 4, "new_timeline": {"resumed_from": os.path.join(out, "ckpt_000004.pt"), "set_aside": aside,
                                        "newest_set_aside": 8}} in read_metrics(out)

    # going back onto the set-aside timeline in this out_dir would mix the two: refused, nothing changed
    before = sorted(os.listdir(out))
    with pytest.raises(SystemExit):
        run(token_dir, out, f"--resume={os.path.join(aside, 'ckpt_000008.pt')}")
    assert "is a set-aside timeline of" in capsys.readouterr().err and sorted(os.listdir(out)) == before

    # the next plain --resume=auto goes on from the rollback's own step 6, not the old timeline's step 8
    capsys.readouterr()
    run(token_dir, out)
    assert f"resumed from {os.path.join(out, 'ckpt_000006.pt')} at step 6" in capsys.readouterr().out
    assert curve(out) == curve(reference)
    final, expected = (torch.load(os.path.join(d, "ckpt_000008.pt"), weights_only=True) for d in (out, reference))
    for name, tensor in expected["model"].items():
        assert torch.equal(final["model"][name], tensor), name


def test_a_sharded_checkpoint_is_a_resume_path(token_dir, tmp_path, capsys):
    # the old code refused a .dcp folder here: "no such checkpoint file"
    out = run(token_dir, tmp_path / "run", "--parallel=fsdp", "--max_steps=4", "--keep_best=false")
    reference = curve(out)
    path = os.path.join(out, "ckpt_000002.dcp")
    capsys.readouterr()
    run(token_dir, out, "--parallel=fsdp", "--max_steps=4", "--keep_best=false", f"--resume={path}")
    assert f"resumed from {path} at step 2" in capsys.readouterr().out
    (aside,) = os.listdir(os.path.join(out, "set_aside"))
    assert os.listdir(os.path.join(out, "set_aside", aside, "ckpt_000004.dcp"))
    assert curve(out) == reference  # one process, float32 on CPU: the same losses exactly
