"""Each bad input and fault of the README's table: exit code 2, one `error:` line, earlier files intact.

Most cases call train.main() in this process (fail() raises SystemExit(2) after printing the line);
the lock, the rank cases and the --help layout use real processes and real torchrun with gloo.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train
from model import GPT, GPTConfig
from tests.conftest import FULL_VOCAB, ROOT, make_token_shards, read_metrics, tiny_args, torchrun, write_examples


def snapshot(*folders):
    """Every file's bytes under the folders: what must come out of a failed run unchanged."""
    files = {}
    for folder in folders:
        for root, _, names in os.walk(folder):
            for name in names:
                if name != ".lock" and not os.path.islink(os.path.join(root, name)):  # /dev/full reads forever
                    with open(os.path.join(root, name), "rb") as f:
                        files[os.path.join(root, name)] = f.read()
    return files


def expect_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    return err


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    base = tmp_path_factory.mktemp("trained")
    data, out = make_token_shards(str(base / "tokens")), str(base / "run")
    train.main(tiny_args(data, out, "--max_steps=2"))
    return data, out


@pytest.fixture
def trained(trained_once, tmp_path):
    """A copy of a finished 2-step run: its data and out_dir are what a bad input must leave intact."""
    data, out = str(tmp_path / "tokens"), str(tmp_path / "run")
    shutil.copytree(trained_once[0], data)
    shutil.copytree(trained_once[1], out)
    return data, out


def damage_manifest_text(data, out):
    with open(os.path.join(data, "manifest.json"), "w") as f:
        f.write("{not json")


def damage_manifest_other(data, out):
    with open(os.path.join(data, "manifest.json"), "w") as f:
        json.dump({"files": ["a.bin"]}, f)


def damage_shard_dtype(data, out):
    path = os.path.join(data, "tiny_train_000001.npy")
    np.save(path, np.load(path).astype(np.int32))


def damage_config_binary(data, out):
    with open(os.path.join(out, "conf.py"), "wb") as f:
        f.write(b"\xff\xfe n_layer = 2\n")


def damage_config_not_python(data, out):
    with open(os.path.join(out, "conf.py"), "w") as f:
        f.write("n_layer: 2\nbatch size = 4\n")


def damage_gpt2_folder(data, out):
    os.makedirs(os.path.join(out, "hf"))
    for name, text in (("config.json", '{"n_layer": 2}'), ("model.safetensors", "not weights")):
        with open(os.path.join(out, "hf", name), "w") as f:
            f.write(text)


def damage_resume_text(data, out):
    with open(os.path.join(out, "notes.pt"), "w") as f:
        f.write("not a checkpoint\n" * 100)


CASES = [  # (extra flags, with {data}/{out} filled in, what is done to the files first, the message)
    (["--device=gpu"], None, "--device=gpu is not a device"),
    (["--device=mps"], None, "MPS is not available"),
    (["--dropout=1.5"], None, "'dropout' must be in [0, 1)"),
    (["--learning_rate=-1"], None, "'learning_rate' must be a finite number >= 0"),
    (["--sample_tokens=-5"], None, "'sample_tokens' must not be negative"),
    (["-batch_size=4"], None, "write flags as --key=value"),
    (["--batch_size"], None, "flag '--batch_size' needs a value"),
    (["{out}/conf.py"], damage_config_binary, "is UTF-8 Python text"),
    (["{out}/conf.py"], damage_config_not_python, "could not be read: SyntaxError"),
    ([], damage_manifest_text, "cannot be read as JSON"),
    ([], damage_manifest_other, "is not a manifest that data/prepare.py writes"),
    ([], damage_shard_dtype, "int32 tokens, manifest.json says"),
    (["--vocab_size=32", "--resume=never", "--out_dir={out}/new"], None, "holds token id 6"),
    (["--vocab_size=128", "--sample_tokens=8"], None, "--vocab_size=128 is smaller than the GPT-2 tokenizer's 50257"),
    (["--init_from={out}/hf", "--out_dir={out}/new"], damage_gpt2_folder, "is not a GPT-2 folder that can be read"),
    (["--resume={out}/notes.pt"], damage_resume_text, "not a checkpoint: train.py writes ckpt_STEP.pt"),
    (["--out_dir={out}/config.json/sub"], None, "cannot create or write --out_dir"),
    (["--activation_checkpointing=some"], None, "'activation_checkpointing' in flag "
                                                "'--activation_checkpointing=some' must be one of none, full, selective"),
    (["--ac_every=0"], None, "config key 'ac_every' must be positive; got 0"),
    (["--batch_size=auto", "--memory_limit_gb=0.25"], None, "--batch_size=auto: even batch_size=1 needs an estimated"),
]
if not torch.cuda.is_available():
    CASES.append((["--device=cuda:1"], None, "--device=cuda:1 but " + (
        "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible")))


@pytest.mark.parametrize("extra, damage, message", CASES, ids=lambda c: c.__name__ if callable(c) else None)
def test_bad_input_is_one_error_line_and_nothing_on_disk_changes(trained, capsys, extra, damage, message):
    data, out = trained
    if damage:
        damage(data, out)
    before = snapshot(data, out)
    capsys.readouterr()
    expect_error(capsys, tiny_args(data, out, "--max_steps=4", *[e.format(data=data, out=out) for e in extra]),
                 message)
    after = snapshot(data, out)
    assert {path: after.get(path) for path in before} == before  # every earlier file, byte for byte


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def gpt2_folder(path, config_json=None):
    """A transformers GPT-2 folder of a tiny model with GPT-2's 50257-token vocabulary; config_json replaces its
    config.json."""
    from gpt2_pretrain.hf_interop import export_hf

    keys = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32}
    export_hf(GPT(GPTConfig(vocab_size=50304, **keys)).state_dict(), keys, path)
    if config_json is not None:
        write(os.path.join(path, "config.json"), config_json)


def interrupted(*args, **kwargs):
    raise KeyboardInterrupt  # Ctrl-C while the shards are opened, before the stop handler is in place


def rename_a_shard_to_a_number(data):
    with open(os.path.join(data, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["shards"][1]["name"] = 5
    write(os.path.join(data, "manifest.json"), json.dumps(manifest))


FORMER_TRACEBACKS = [  # (program, its arguments with {data}/{out}, what is set up first, the message)
    ("train", ["--learning_rate=0"], None, "config key 'learning_rate' must be positive; got 0.0"),
    ("train", ["--seed=-1"], None, "config key 'seed' must not be negative; got -1"),
    ("train", ["--architecture=modern", "--n_head=32"], None,
     "--rotary rotates pairs of a head's channels: n_embd / n_head (32 / 32) must be even"),
    ("train", ["{out}/exit.py"], lambda d, o, m: write(f"{o}/exit.py", "import sys\nsys.exit(3)\n"),
     "config file '{out}/exit.py' could not be read: SystemExit: 3"),
    ("train", ["--max_steps", "100"], None, "'--max_steps 100': flags take --key=value, with no space: write "
                                           "--max_steps=100."),
    ("train", ["--hellaswag=true", "--hellaswag_path={out}/hs.jsonl", "--vocab_size=50304", "--out_dir={out}/new"],
     lambda d, o, m: write(f"{o}/hs.jsonl", "ctx, endings, label\n"), "{out}/hs.jsonl line 1 is not JSON ("),
    ("train", ["--init_from={out}/hf", "--out_dir={out}/new"], lambda d, o, m: gpt2_folder(f"{o}/hf", "[1, 2]"),
     "init_from '{out}/hf' is not a GPT-2 folder that can be read (ValueError: its config.json holds a list, not "
     "a JSON object)"),
    ("train", ["--init_from={out}/hf", "--out_dir={out}/new", "--n_layer=1", "--n_embd=16"],
     lambda d, o, m: gpt2_folder(f"{o}/hf"), "init_from '{out}/hf' has a vocabulary of 50257 tokens, more than "
                                             "--vocab_size=128: raise vocab_size to at least 50257"),
    ("train", [], lambda d, o, m: rename_a_shard_to_a_number(d), "is not a manifest that data/prepare.py writes"),
    ("train", [], lambda d, o, m: m.setattr(train, "DataLoader", interrupted),
     "interrupted by Ctrl-C before a checkpoint could be written: the checkpoints already in out_dir are kept"),
    ("prepare", ["--verify", "{data}"], lambda d, o, m: write(f"{d}/manifest.json", "[1, 2]"),
     "{data}/manifest.json is not a manifest that prepare.py writes (TypeError: "),
    ("eval", ["{out}/empty", "--device=cpu"], lambda d, o, m: os.makedirs(f"{o}/empty"),
     "no usable checkpoint (ckpt_STEP.pt / best_STEP.pt) in {out}/empty"),
    ("eval", ["{out}/hf", "--device=cpu"], lambda d, o, m: write(f"{o}/hf/config.json", "{"),
     "{out}/hf is not a GPT-2 folder that can be read (JSONDecodeError: "),
    ("sample", ["{out}", "--top_k=-1"], None, "--top_k=-1 is out of range: --top_k >= 0 (0: all tokens)"),
    ("sample", ["{out}", "--num_samples=0"], None, "--num_samples=0 is out of range"),
    ("sample", ["{out}", "--temperature=nan"], None, "--temperature=nan is out of range"),
    ("plot", ["{out}", "--out", "{out}/metrics.jsonl/loss.png"], None,
     "cannot write --out {out}/metrics.jsonl/loss.png"),
]


@pytest.mark.parametrize("program, args, setup, message", FORMER_TRACEBACKS,
                         ids=[f"{row[0]}{i}" for i, row in enumerate(FORMER_TRACEBACKS)])
def test_former_tracebacks_are_one_error_line(trained, capsys, monkeypatch, program, args, setup, message):
    import data.prepare as prepare_script
    import scripts.eval
    import scripts.plot
    import scripts.sample

    data, out = trained
    if setup:
        setup(data, out, monkeypatch)
    before = snapshot(data, out)
    capsys.readouterr()
    argv = [a.format(data=data, out=out) for a in args]
    main = {"train": lambda: train.main(tiny_args(data, out, "--max_steps=4", *argv)),
            "prepare": lambda: prepare_script.main(argv), "eval": lambda: scripts.eval.main(argv),
            "sample": lambda: scripts.sample.main(argv), "plot": lambda: scripts.plot.main(argv)}[program]
    try:
        code = main()
    except SystemExit as e:
        code = e.code
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and message.format(data=data, out=out) in errors[0], errors
    after = snapshot(data, out)
    assert {path: after.get(path) for path in before} == before


def test_eval_takes_an_out_dir_like_sample_and_export(token_dir, tmp_path, capsys):
    # the old code read an out_dir as a GPT-2 folder and raised FileNotFoundError on its missing safetensors
    import scripts.eval

    out, examples = str(tmp_path / "run"), write_examples(tmp_path / "hellaswag.jsonl")
    train.main(tiny_args(token_dir, out, FULL_VOCAB, "--max_steps=1"))  # HellaSwag text needs GPT-2's vocab
    scores = []
    for model in (out, os.path.join(out, "ckpt_000001.pt")):  # the reference: the checkpoint file itself
        capsys.readouterr()
        assert scripts.eval.main([model, f"--hellaswag_path={examples}", "--device=cpu"]) == 0
        scores.append(capsys.readouterr().out.splitlines()[-1])
    assert scores[0] == scores[1] and scores[0].startswith("hellaswag: acc ")


def test_full_disk_at_a_checkpoint_keeps_the_last_good_one(trained, capsys):
    """Writes that fail with ENOSPC from the kernel (the temporary files point at /dev/full): the periodic
    save is skipped with a warning and training goes on; the final one ends the run; ckpt_000002 is intact."""
    data, out = trained
    for step in (4, 6):
        os.symlink("/dev/full", os.path.join(out, f"ckpt_{step:06d}.pt.tmp.{os.getpid()}"))
    before = snapshot(out)
    capsys.readouterr()
    err = expect_error(capsys, tiny_args(data, out, "--max_steps=6", "--checkpoint_interval=2"),
                       "no space left for")
    assert "ckpt_000006.pt" in err and "the newest checkpoint kept is" in err and "ckpt_000002.pt" in err
    assert "Free some space, then continue with --resume=auto" in err
    path = os.path.join(out, "ckpt_000002.pt")
    assert snapshot(out)[path] == before[path]
    names = sorted(os.listdir(out))
    assert "ckpt_000004.pt" not in names and "ckpt_000006.pt" not in names
    assert not [n for n in names if ".tmp." in n]  # the temporary files are gone


def test_full_disk_warning_says_needed_and_free(trained, capsys):
    data, out = trained
    os.symlink("/dev/full", os.path.join(out, f"ckpt_000004.pt.tmp.{os.getpid()}"))
    capsys.readouterr()
    train.main(tiny_args(data, out, "--max_steps=5", "--checkpoint_interval=2"))
    printed = capsys.readouterr().out
    assert "warning: no space left for" in printed and "a checkpoint needs about" in printed
    assert "MB are free on that disk" in printed and "Training goes on" in printed
    assert sorted(n for n in os.listdir(out) if n.startswith("ckpt_")) == ["ckpt_000002.pt", "ckpt_000005.pt"]


@pytest.mark.slow
def test_a_second_run_on_one_out_dir_is_refused_until_the_first_is_killed(trained, capsys):
    data, out = trained
    first = subprocess.Popen([sys.executable, "train.py", *tiny_args(data, out, "--max_steps=100000",
                                                                     "--eval_interval=100000")],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock, deadline = os.path.join(out, ".lock"), time.time() + 120
        while f"pid {first.pid} " not in (open(lock).read() if os.path.exists(lock) else ""):
            assert first.poll() is None and time.time() < deadline, "the first run never took the lock"
            time.sleep(0.1)
        before = snapshot(data, out)
        capsys.readouterr()
        expect_error(capsys, tiny_args(data, out, "--max_steps=2"), f"is in use by another run (pid {first.pid} on ")
        assert {k: v for k, v in snapshot(data, out).items() if not k.endswith("metrics.jsonl")} == {
            k: v for k, v in before.items() if not k.endswith("metrics.jsonl")}  # the first run's log still grows
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    train.main(tiny_args(data, out, "--max_steps=3"))  # the killed run left no lock behind
    assert os.path.isfile(os.path.join(out, "ckpt_000003.pt"))


def test_help_has_one_column_of_help_text(capsys):
    assert train.main(["--help"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("    --")]
    assert len(rows) > 40
    for row, below in zip(rows, rows[1:] + [""]):  # a long flag puts its help on the next line, same column
        help_line = row if len(row) > 34 and row[32:34] == "  " else below
        assert help_line[32:34] == "  " and help_line[34] != " ", row


@pytest.mark.slow
def test_torchrun_refuses_a_gpu_index_once(token_dir, tmp_path):
    result = torchrun(2, "train.py", tiny_args(token_dir, str(tmp_path / "out"), "--device=cuda:1"))
    assert result.returncode != 0
    assert result.stderr.count("error: --device=cuda:1 under torchrun would put every rank on GPU 1") == 1
    assert 'train.py", line' not in result.stderr


@pytest.mark.slow
def test_an_error_every_rank_sees_is_printed_once(token_dir, tmp_path):
    damage_manifest_text(token_dir, None)  # every rank reads it after the process group is up
    result = torchrun(2, "train.py", tiny_args(token_dir, str(tmp_path / "out")))
    assert result.returncode != 0
    assert result.stderr.count("cannot be read as JSON") == 1 and "[rank" not in result.stderr
    assert 'train.py", line' not in result.stderr


@pytest.mark.slow
def test_full_disk_at_a_sharded_checkpoint_is_survived_like_at_a_pt_file(token_dir, tmp_path):
    """Test hooks fill the disk: rank 1's shard file mid-tensor at steps 4 and 8 (torch.save's "unexpected pos"
    inside DCP), rank 0's meta.pt after every shard at step 6. The periodic saves at 4 and 6 are skipped with a
    warning, the final one at 8 ends both ranks with one error line, at once rather than after the 300 s a rank
    would wait in a collective; no partial folder is left, and once space is free the run resumes from step 2
    with the same losses."""
    out = str(tmp_path / "out")
    args = tiny_args(token_dir, out, "--parallel=fsdp", "--max_steps=8", "--checkpoint_interval=2",
                     "--eval_interval=8")
    started = time.time()
    result = torchrun(2, "train.py", args, env={"GPT2_DEBUG_FULL_SHARD_STEPS": "4,8",
                                                "GPT2_DEBUG_FULL_DISK_STEPS": "6"}, timeout=150)
    print(f"the run took {time.time() - started:.1f}s")
    assert result.returncode != 0
    kept = os.path.join(out, "ckpt_000002.dcp")
    for step in (4, 6):
        assert (f"warning: no space left for {os.path.join(out, f'ckpt_{step:06d}.dcp')}: a checkpoint needs about"
                in result.stdout)
    assert result.stdout.count(f"the newest checkpoint kept is {kept}. Training goes on") == 2
    assert result.stderr.count("error: ") == 1 and 'train.py", line' not in result.stderr, result.stderr
    assert "unexpected pos" not in result.stderr and "CheckpointException" not in result.stderr
    assert f"error: no space left for {os.path.join(out, 'ckpt_000008.dcp')}: " in result.stderr
    assert f"the newest checkpoint kept is {kept}. Free some space, then continue with --resume=auto" in result.stderr
    assert sorted(n for n in os.listdir(out) if "ckpt" in n or n.startswith(".shared")) == ["ckpt_000002.dcp"]
    assert torch.load(os.path.join(kept, "meta.pt"), weights_only=True)["step"] == 2
    first = [(m["step"], m["loss"]) for m in read_metrics(out) if "loss" in m]

    # space freed (no hooks): the same command resumes at step 2 and trains the same steps again, bit for bit
    result = torchrun(2, "train.py", args, timeout=150)
    assert result.returncode == 0, result.stderr
    assert f"resumed from {kept} at step 2" in result.stdout
    assert [(m["step"], m["loss"]) for m in read_metrics(out) if "loss" in m] == first
    assert sorted(n for n in os.listdir(out) if "ckpt" in n) == [f"ckpt_{s:06d}.dcp" for s in (2, 6, 8)]  # 2: the start


@pytest.mark.slow
def test_an_error_only_rank_1_sees_reaches_the_user(token_dir, tmp_path):
    args = tiny_args(token_dir, str(tmp_path / "out"), "--max_steps=50", "--eval_interval=100")
    result = torchrun(2, "tests/torchrun_worker.py", args, env={"TEST_FAIL_RANK": "1", "TEST_FAIL_MODE": "data"})
    assert result.returncode != 0
    assert result.stderr.count("error: [rank 1] injected: a shard only this rank reads is unreadable") == 1
    assert result.stderr.count("error: ") == 1  # rank 0, cut off from rank 1, does not add a line of its own
    assert "Traceback" not in result.stderr.split("error: [rank 1]")[0]


def wait_for(condition, process, what, seconds=120):
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"no {what} within {seconds}s"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_shard_written_in_place_under_a_running_job_stops_it_cleanly(trained):
    data, out = trained
    ckpt = os.path.join(out, "ckpt_000004.pt")
    run = subprocess.Popen([sys.executable, "train.py", *tiny_args(data, out, "--max_steps=100000", "--keep_last=0",
                                                                   "--checkpoint_interval=2", "--eval_interval=1000")],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: os.path.exists(ckpt), run, "checkpoint at step 4")
        with open(ckpt, "rb") as f:
            saved = f.read()
        for name in ("tiny_train_000001.npy", "tiny_train_000002.npy"):  # the same size, other tokens
            tokens = np.load(os.path.join(data, name), mmap_mode="r+")
            tokens[:] = tokens[::-1].copy()
            tokens.flush()
        _, err = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 2 and "Traceback" not in err
    assert "was changed in place while training" in err and "--resume=auto" in err
    with open(ckpt, "rb") as f:
        assert f.read() == saved


def test_a_record_cut_short_by_a_kill_is_dropped_on_resume_and_by_plot(trained, capsys):
    from scripts.plot import read_run

    data, out = trained
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 2, "loss": 1.2')  # a kill in the middle of a line
    assert [r["step"] for r in read_run(out)[1]] == [0, 0, 1, 2]
    train.main(tiny_args(data, out, "--max_steps=3"))
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == [0, 0, 1, 2, 2, 3]


def test_scripts_refuse_a_file_that_is_not_theirs(trained, capsys):
    from scripts import eval as eval_script
    from scripts import export_hf, plot, sample

    data, out = trained
    damage_resume_text(data, out)
    notes = os.path.join(out, "notes.pt")
    with pytest.raises(SystemExit) as exit_info:
        sample.main([notes, "--device=cpu"])
    assert exit_info.value.code == 2 and "not a checkpoint" in capsys.readouterr().err
    assert eval_script.main([notes, "--device=cpu"]) == 2 and "not a checkpoint" in capsys.readouterr().err
    assert export_hf.main([notes, str(out)]) == 2 and "not a checkpoint" in capsys.readouterr().err
    ckpt = os.path.join(out, "ckpt_000002.pt")
    assert export_hf.main([ckpt, os.path.join(out, "config.json", "hf")]) == 2
    assert "cannot write" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        plot.read_run(ckpt)
    assert exit_info.value.code == 2 and "line 1 is not a metrics record" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.json.tmp.{pid}"])  # {pid}: atomic_write's temporary
def test_full_disk_at_any_other_write_is_one_error_line(trained, capsys, name):
    data, out = trained
    new = os.path.join(out, "new")
    os.makedirs(new)
    os.symlink("/dev/full", os.path.join(new, name.format(pid=os.getpid())))  # writes fail with ENOSPC, from the kernel
    before = snapshot(data, out)
    capsys.readouterr()
    expect_error(capsys, tiny_args(data, new, "--max_steps=2"), "no space left on the disk of")
    after = snapshot(data, out)
    assert {path: after.get(path) for path in before} == before
