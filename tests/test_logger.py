"""W&B tracking: what an offline run recorded (read back from its .wandb log with wandb's own protobufs),
resuming the same run id, and the auto mode's login check against wandb's own netrc reader."""

import glob
import json
import os
import struct
import sys

import pytest

import train
from gpt2_pretrain.logging import Logger, format_line, resolve_wandb_mode
from tests.conftest import FULL_VOCAB, read_metrics, tiny_args

BLOCK = 32768  # the .wandb file is a leveldb-format log: 32 KiB blocks of checksummed chunks


def wandb_records(path):
    """Yield the wandb_internal_pb2.Record messages of a .wandb transaction log."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if BLOCK - position % BLOCK < 7:  # too little room left for a chunk header: the block is padded
            position += BLOCK - position % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_wandb_run(run_dir):
    """(run id, config dict, list of history rows as dicts) from an offline run folder."""
    import wandb

    # run.finish() can return before wandb's service process has written out and closed the .wandb file;
    # teardown waits for that service to finish and exit (a later wandb.init starts a new one)
    wandb.teardown()
    (path,) = glob.glob(os.path.join(run_dir, "*.wandb"))
    run_id, config, rows = None, {}, []
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return run_id, config, rows


def test_offline_run_logs_metrics_samples_config_and_resumes_same_run(token_dir, tmp_path, wandb_env):
    out = str(tmp_path / "run")
    train.main(tiny_args(token_dir, out, "--wandb_mode=offline", "--sample_tokens=4", FULL_VOCAB, "--max_steps=2",
                         "--peak_flops=1e12", "--wandb_run_name=tiny"))
    (run_dir,) = glob.glob(os.path.join(out, "wandb", "offline-run-*"))
    run_id, config, rows = read_wandb_run(run_dir)
    assert config["n_embd"] == 32 and config["max_steps"] == 2 and config["wandb_mode"] == "offline"
    saved = json.load(open(os.path.join(out, "config.json")))
    assert {key: config[key] for key in saved} == saved  # the resolved config is the run config
    logged = read_metrics(out)
    train_rows = [row for row in rows if "train/loss" in row]
    assert [row["_step"] for row in train_rows] == [0, 1]
    for row, record in zip(train_rows, [m for m in logged if "loss" in m]):
        assert row["train/loss"] == pytest.approx(record["loss"])
        assert row["train/grad_norm"] == pytest.approx(record["grad_norm"])
        assert row["train/lr"] == pytest.approx(record["lr"])
        assert row["train/tokens_per_sec"] == pytest.approx(record["tokens_per_sec"])
        assert row["train/mfu"] == pytest.approx(record["mfu"])
    val_rows = [row for row in rows if "val/loss" in row]
    assert [row["val/loss"] for row in val_rows] == pytest.approx([m["val_loss"] for m in logged if "val_loss" in m])
    assert any(row.get("samples/_type") == "table-file" for row in rows)  # samples go in as a W&B table

    # resume: a Logger given the stored id continues the same run, at later steps
    logger = Logger(out, wandb_mode="offline", wandb_project="gpt2-pretrain", config=saved, wandb_run_id=run_id)
    assert logger.wandb_run_id == run_id
    logger.log({"step": 2, "loss": 1.5, "lr": 1e-4, "grad_norm": 0.5, "dt_ms": 1.0, "tokens_per_sec": 10.0})
    logger.finish()
    (resumed_dir,) = set(glob.glob(os.path.join(out, "wandb", "offline-run-*"))) - {run_dir}
    resumed_id, resumed_config, resumed_rows = read_wandb_run(resumed_dir)
    assert resumed_id == run_id and resumed_config["n_embd"] == 32
    assert [(row["_step"], row["train/loss"]) for row in resumed_rows] == [(2, 1.5)]


NETRC_KEY = "a" * 40


def wandb_netrc_key(host):
    """wandb's own reading of the netrc: the reference for our check."""
    from wandb.sdk.lib.wbauth import read_netrc_auth

    return read_netrc_auth(host=host)


@pytest.mark.parametrize("netrc_host, base_url, expected", [
    (None, None, "offline"),
    ("api.wandb.ai", None, "online"),
    ("wandb.example.com", None, "offline"),
    ("wandb.example.com", "https://wandb.example.com", "online"),
])
def test_auto_mode_is_online_exactly_when_wandb_finds_a_login(tmp_path, monkeypatch, netrc_host, base_url, expected):
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.chdir(tmp_path)
    netrc_path = tmp_path / "my_netrc"
    monkeypatch.setenv("NETRC", str(netrc_path))
    if netrc_host:
        netrc_path.write_text(f"machine {netrc_host}\n  login user\n  password {NETRC_KEY}\n")
        netrc_path.chmod(0o600)
    if base_url:
        monkeypatch.setenv("WANDB_BASE_URL", base_url)
    assert resolve_wandb_mode("auto") == expected
    assert (wandb_netrc_key(base_url or "https://api.wandb.ai") is not None) == (expected == "online")


def test_auto_mode_follows_api_key_settings_file_and_wandb_mode(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.chdir(tmp_path)
    assert resolve_wandb_mode("auto") == "offline"
    os.makedirs(tmp_path / "wandb_config")
    (tmp_path / "wandb_config" / "settings").write_text(f"[default]\napi_key = {NETRC_KEY}\n")
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"
    assert resolve_wandb_mode("offline") == "offline"  # an explicit key wins
    monkeypatch.delenv("WANDB_MODE")
    os.remove(tmp_path / "wandb_config" / "settings")
    monkeypatch.setenv("WANDB_API_KEY", NETRC_KEY)
    assert resolve_wandb_mode("auto") == "online"


def test_step_line_says_mfu_na_without_a_peak():
    metrics = {"step": 3, "loss": 2.0, "lr": 1e-3, "grad_norm": 0.5, "dt_ms": 12.0, "tokens_per_sec": 1000.0}
    assert format_line({**metrics, "mfu": None}).endswith("mfu n/a")
    assert format_line({**metrics, "mfu": 0.4567}).endswith("mfu 45.7%")


def test_explicit_online_mode_without_a_login_is_one_clear_error(token_dir, tmp_path, monkeypatch, wandb_env, capsys):
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(token_dir, str(tmp_path / "run"), "--wandb_mode=online"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "error: W&B online mode could not start" in error and "wandb login" in error


def test_without_wandb_installed_auto_mode_logs_locally_and_explicit_modes_say_so(token_dir, tmp_path, monkeypatch,
                                                                                  capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError, as where it is missing
    monkeypatch.setenv("WANDB_MODE", "offline")  # auto would pick offline: a mode that needs wandb
    out = str(tmp_path / "run")
    train.main([arg for arg in tiny_args(token_dir, out, "--max_steps=2") if arg != "--wandb_mode=disabled"])
    assert "wandb is not installed" in capsys.readouterr().out
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [0, 1]
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(token_dir, str(tmp_path / "offline"), "--wandb_mode=offline"))
    assert exit_info.value.code == 2
    assert "error: --wandb_mode=offline needs wandb, which is not installed" in capsys.readouterr().err
