"""--batch_size=auto (gpt2_pretrain/auto_batch.py) under a small --memory_limit_gb on CPU, against the largest
batch found by trying every batch_size on the --dry_run estimate written out here (its counted bytes, then
dry_run.MARGIN's factor and fixed bytes)."""

import re

import pytest

import train
from gpt2_pretrain import auto_batch
from gpt2_pretrain.dry_run import MARGIN, memory_estimate, meta_model
from tests.conftest import tiny_args

SEQUENCES = 64  # total_batch_size / (block_size * world_size): the candidates are 1, 2, 4, ..., 64


def estimated_peak(flags, batch_size):
    """The CPU estimate of one process at batch_size, its margin applied by hand."""
    config = train.load_config([*flags, f"--batch_size={batch_size}"])
    n_params = meta_model(train.model_config(config)).num_params()
    factor, fixed = MARGIN["cpu"]
    return factor * sum(memory_estimate(config, n_params, bf16=False, device_type="cpu").values()) + fixed


def largest_fitting(flags, limit_bytes):
    """By brute force over every batch_size: the largest power of two dividing SEQUENCES whose peak fits."""
    fits = [b for b in range(1, SEQUENCES + 1) if SEQUENCES % b == 0 and b & (b - 1) == 0
            and estimated_peak(flags, b) <= limit_bytes]
    return max(fits, default=0)


def dry_run(capsys, flags):
    capsys.readouterr()
    assert train.main([*flags, "--batch_size=auto", "--dry_run"]) == 0
    out = capsys.readouterr().out
    batch, accum = re.search(r"grad_accum_steps: (\d+) \| micro-batch: (\d+) x", out).group(2, 1)
    return int(batch), int(accum), out


def test_auto_picks_the_largest_batch_whose_estimate_fits_and_keeps_the_tokens_per_step(token_dir, tmp_path,
                                                                                         capsys, monkeypatch):
    # the limit is --memory_limit_gb, not what other processes on this machine leave free at the moment
    monkeypatch.setattr(auto_batch, "available_ram", lambda: 2**40)
    flags = tiny_args(token_dir, str(tmp_path), "--n_layer=4", f"--total_batch_size={SEQUENCES * 32}")
    # a limit halfway between the peaks of batch 8 and 16: auto must land on 8, the margin included
    limit = (estimated_peak(flags, 8) + estimated_peak(flags, 16)) / 2
    limit_gb = limit / 2**30
    flags.append(f"--memory_limit_gb={limit_gb!r}")
    assert largest_fitting(flags, limit) == 8
    batch, accum, out = dry_run(capsys, flags)
    assert (batch, accum) == (8, SEQUENCES // 8)  # total_batch_size kept: 8 sequences x 8 micro-steps x 32
    assert "tokens per step: 2,048" in out and "batch_size=auto: 8, estimated peak" in out
    assert f"16 would need {estimated_peak(flags, 16) / 2**30:.2f} GiB" in out  # the next candidate, over the limit

    # full checkpointing keeps only each block's input: under the same limit a larger batch fits
    full = [*flags, "--activation_checkpointing=full"]
    batch_full, accum_full, _ = dry_run(capsys, full)
    assert batch_full == largest_fitting(full, limit) > 8 and accum_full == SEQUENCES // batch_full


def test_auto_when_even_one_sequence_does_not_fit_is_one_error_line(token_dir, tmp_path, capsys):
    flags = tiny_args(token_dir, str(tmp_path), "--batch_size=auto", "--memory_limit_gb=0.25")
    with pytest.raises(SystemExit) as exit_info:
        train.main([*flags, "--dry_run"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    over = estimated_peak(flags[:-2], 1) - 0.25 * 2**30  # the fixed margin alone is 0.5 GiB
    assert err.startswith("error: --batch_size=auto: even batch_size=1 needs an estimated ")
    assert f"{over / 2**30:.2f} GiB more than 0.25 GiB (--memory_limit_gb=0.25;" in err
