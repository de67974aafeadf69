"""MFU against a hand count, --dry_run (its data check and warnings), the step line and the end-of-run
summary, scripts/plot.py and scripts/bench.py on tiny runs."""

import importlib
import os
import re
import shlex
import signal
import subprocess
import sys

import pytest
import torch

import train
from gpt2_pretrain.checkpoint.checksum import with_checksum
from gpt2_pretrain.dry_run import meta_model
from gpt2_pretrain.flops import device_peak_flops, mfu, model_flops_per_token, peak_flops_for
from model import GPT
from tests.conftest import FULL_VOCAB, ROOT, TINY_MODEL, read_metrics, run_python, tiny_args


def hand_flops_per_token(n_layer, n_embd, block_size, vocab_size):
    """6N + 12*L*C*T, with N the matmul weights counted by hand: the blocks' four and lm_head."""
    per_block = n_embd * 3 * n_embd + n_embd * n_embd + n_embd * 4 * n_embd + 4 * n_embd * n_embd
    n_weights = n_layer * per_block + n_embd * vocab_size
    return 6 * n_weights + 12 * n_layer * n_embd * block_size


@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_token_match_torch_flop_counter(tied):
    """Forward + backward of a model, its logits in full (the chunked loss does the same matmuls, but one of
    them in place, addmm_, which FlopCounterMode does not see), attention on the math kernel (the CPU's
    fused kernel is not counted): FlopCounterMode's count against ours, tied head or not."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from model import GPTConfig

    config = GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=2, n_embd=64, tie_embeddings=tied)
    torch.manual_seed(0)
    model = GPT(config)
    idx = torch.randint(0, 256, (2, 64))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        logits, _ = model(idx)
        torch.nn.functional.cross_entropy(logits.view(-1, 256), idx.view(-1)).backward()
    # 2%: the bound; both count matmuls only (no layer norms, biases, softmax), so they agree exactly here
    assert model_flops_per_token(model) == pytest.approx(counter.get_total_flops() / idx.numel(), rel=0.02)


@pytest.mark.parametrize("device_name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200 NVL", 835e12),
])
def test_mfu_matches_a_hand_computation(device_name, peak):
    config = train.model_config(train.load_config(["configs/gpt2_124m.py"]))
    per_token = hand_flops_per_token(12, 768, 1024, 50304)
    model = meta_model(config)  # GPT-2 124M's shapes without allocating it
    assert model_flops_per_token(model) == per_token
    tokens_per_sec = 400_000.0  # over 2 GPUs
    expected = per_token * tokens_per_sec / (2 * peak)
    assert mfu(model_flops_per_token(model), tokens_per_sec, peak_flops_for(device_name), 2) == \
        pytest.approx(expected, rel=1e-12)


def test_mfu_is_none_on_cpu_and_unknown_gpus_unless_overridden():
    assert device_peak_flops("cpu") is None and device_peak_flops("mps") is None
    assert peak_flops_for("Some Future GPU") is None
    assert mfu(1e9, 1e5, None) is None
    assert peak_flops_for("Some Future GPU", override=5e14) == 5e14 and device_peak_flops("cpu", 1e12) == 1e12


def test_cpu_run_logs_null_mfu_and_plot_draws_two_runs(token_dir, tmp_path):
    runs = []
    for seed in (1, 2):
        out = str(tmp_path / f"run{seed}")
        train.main(tiny_args(token_dir, out, "--max_steps=3", f"--seed={seed}"))
        runs.append(out)
    steps = [m for m in read_metrics(runs[0]) if "loss" in m]
    assert len(steps) == 3 and all("mfu" in m and m["mfu"] is None for m in steps)
    png = str(tmp_path / "plots" / "both.png")
    result = run_python(["scripts/plot.py", os.path.join(runs[0], "metrics.jsonl"), runs[1], "--out", png])
    assert result.returncode == 0, result.stderr
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 10_000


def dry_run(capsys, *flags):
    """(exit code, stdout, stderr) of train.main([... --dry_run]) in this process."""
    capsys.readouterr()
    try:
        code = train.main([*TINY_MODEL, "--batch_size=4", "--total_batch_size=512", "--dry_run", *flags])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_dry_run_prints_the_numbers_and_the_data_without_training(token_dir, tmp_path, capsys):
    out = tmp_path / "never"
    flags = ["--vocab_size=512", "--sample_tokens=0", "--max_steps=7", f"--data_dir={token_dir}", f"--out_dir={out}"]
    code, stdout, _ = dry_run(capsys, *flags)
    assert code == 0
    real = GPT(train.model_config(train.load_config([*TINY_MODEL, *flags]))).num_params()
    assert f"parameters: {real:,}" in stdout
    assert "grad_accum_steps: 4" in stdout  # 512 / (4 * 32)
    assert "total tokens: 3,584" in stdout  # 512 * 7
    assert re.search(r"FLOPs per step: [\d.e+]+", stdout)
    memory = r"weights [\d.]+ GiB, gradients [\d.]+ GiB, optimizer state [\d.]+ GiB, activations [\d.]+ GiB"
    assert re.search(memory, stdout)
    assert f"data: {token_dir} holds 12,000 train and 3,000 val tokens" in stdout  # conftest's shards
    assert "warning: warmup_steps (715) >= max_steps (7)" in stdout  # the default warmup
    assert "passes" not in stdout  # 3,584 tokens of 12,000
    assert not out.exists()


def test_dry_run_warns_of_a_warmup_past_the_end_and_of_repeated_data(token_dir, capsys, monkeypatch):
    from gpt2_pretrain import dry_run as dry_run_module

    # no warning about the RAM that other processes on this machine leave free at the moment
    monkeypatch.setattr(dry_run_module, "available_ram", lambda: 2**40)
    code, out, _ = dry_run(capsys, f"--data_dir={token_dir}", "--max_steps=50", "--warmup_steps=715")
    assert code == 0
    assert ("warning: warmup_steps (715) >= max_steps (50): the learning rate is still warming up at the last step "
            "(7% of learning_rate)") in out and "set --warmup_steps=5" in out
    # 50 * 512 = 25,600 tokens planned over 12,000 train tokens
    assert "plans 25,600 tokens" in out and "holds 12,000: about 2.1 passes" in out
    code, out, _ = dry_run(capsys, f"--data_dir={token_dir}", "--max_steps=20", "--warmup_steps=2")
    assert code == 0 and "warning" not in out  # 10,240 tokens, warmup well inside the run


def test_dry_run_without_data_ends_with_the_error_a_run_gives(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    code, out, err = dry_run(capsys, f"--data_dir={missing}")
    assert code == 2 and "total tokens:" in out  # the report first, then the data check
    run_code, _, run_err = dry_run(capsys, f"--data_dir={missing}", "--dry_run=false", f"--out_dir={tmp_path}/out")
    assert run_code == 2 and err == run_err
    assert err.startswith(f"error: no manifest.json in '{missing}'") and "Traceback" not in err


def test_raw_text_as_data_dir_gets_a_prepare_command_with_a_new_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("my_texts/more")
    for name in ("my_texts/a.txt", "my_texts/more/b.txt"):
        with open(name, "w") as f:
            f.write("Some text.\n")
    with open("notes.jsonl", "w") as f:
        f.write('{"text": "Some text."}\n')
    expected = {
        "my_texts/": ("holds raw text (2 .txt files)", "--source my_texts/ --out data/my_texts_tokens"),
        "notes.jsonl": ("is a .jsonl file of raw text", "--source notes.jsonl --out data/notes_tokens"),
        ".": ("holds raw text (3 .jsonl/.txt files)", f"--source . --out ../{tmp_path.name}_tokens"),
    }
    for data_dir, (what, command) in expected.items():
        for mode in ("--dry_run", "--dry_run=false"):  # the same line before a real run and in a dry one
            code, _, err = dry_run(capsys, f"--data_dir={data_dir}", mode, "--out_dir=out", "--device=cpu",
                                   "--wandb_mode=disabled")
            assert code == 2 and err.startswith(f"error: --data_dir={data_dir} {what}, not tokenized shards"), err
            assert f"python data/prepare.py {command}\n" in err and "Traceback" not in err
    assert sorted(os.listdir(".")) == ["my_texts", "notes.jsonl"]  # the refused runs left no out/ behind


def summary_command(printed, name):
    """The argv of the summary's `name:` command, with `python` as this interpreter (the user's python)."""
    line = next(line for line in printed.splitlines() if line.startswith(f"  {name}:"))
    argv = shlex.split(line.split(":", 1)[1])
    return [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]


@pytest.fixture
def one_thread():
    """Tiny models in one thread: with the cores busy, two threads of small ops wait on each other (sampling
    200 tokens took 15x longer with 2 threads than with 1 on the shared 2-core dev box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_resumed_run_counts_the_time_before_and_names_a_max_steps_behind_it(token_dir, tmp_path, capsys,
                                                                             one_thread):
    out = str(tmp_path / "run")
    capsys.readouterr()
    train.main(tiny_args(token_dir, out, "--max_steps=2"))
    printed = capsys.readouterr().out
    shards = sum(os.path.getsize(os.path.join(token_dir, n)) for n in os.listdir(token_dir) if n.endswith(".npy"))
    assert f"checked the sha256 of {shards / 1e3:.0f} kB of shards" in printed  # not "0.00 GB"
    path = os.path.join(out, "ckpt_000002.pt")
    checkpoint = torch.load(path, weights_only=True)
    assert 0 < checkpoint["run_seconds"] < 600
    checkpoint["run_seconds"] = 3600.0  # as if the first process had run an hour
    torch.save(with_checksum(checkpoint), path)  # its checksum too: a checkpoint changed otherwise is unusable
    train.main(tiny_args(token_dir, out, "--max_steps=4"))
    printed = capsys.readouterr().out
    assert re.search(r"run finished at step 4/4 in 1h00m \(\d+s of it in this process\)", printed)
    # continuing the finished run stretches the cosine: at step 2 the lr was min_lr (1e-4) and is now the peak
    # (1e-3, the cosine's start after 2 warmup steps), as the resumed run's step line logs it
    assert ("warning: resume at step 2: the learning rate was 1.000e-04 on the checkpoint's schedule and is "
            "1.000e-03 on this one (max_steps 2 -> 4)") in printed
    assert next(m["lr"] for m in read_metrics(out) if m.get("step") == 2 and "lr" in m) == pytest.approx(1e-3)
    train.main(tiny_args(token_dir, out, "--max_steps=2"))
    printed = capsys.readouterr().out
    assert "the checkpoint is at step 4, past --max_steps=2: nothing to train; give --max_steps above 4" in printed
    assert "max_steps=2: raise" not in printed
    assert summary_command(printed, "continue")[-1] == "--max_steps=6"  # past step 4: it trains (2 * 2 would not)


def test_settings_the_optimizer_ignores_are_named(token_dir, capsys):
    code, out, _ = dry_run(capsys, f"--data_dir={token_dir}", "--optimizer=muon", "--weight_decay=0.2", "--beta1=0.8")
    assert code == 0 and "warning: --optimizer=muon ignores weight_decay=0.2, beta1=0.8 (set away from" in out
    code, out, _ = dry_run(capsys, f"--data_dir={token_dir}", "--matrix_lr=0.05")
    assert code == 0 and "warning: --optimizer=adamw ignores matrix_lr=0.05 (set away from" in out
    code, out, _ = dry_run(capsys, f"--data_dir={token_dir}", "--optimizer=muon", "--matrix_lr=0.05")
    assert code == 0 and "ignores" not in out


def test_data_sizes_read_in_their_own_unit():
    from gpt2_pretrain.logging import data_size

    assert [data_size(n) for n in (30_240, 3_400_000, 20_100_000_000)] == ["30 kB", "3.4 MB", "20.1 GB"]


@pytest.mark.slow  # starts a Python process that imports torch: about 4 s each on the 2-core box
def test_step_lines_show_progress_and_the_run_ends_with_a_summary_whose_commands_run(token_dir, tmp_path, capsys,
                                                                                     one_thread):
    out = str(tmp_path / "run")
    # the GPT-2 vocab: the summary's commands sample and export to a transformers folder with GPT-2's tokenizer
    args = tiny_args(token_dir, out, "--max_steps=3", "--eval_interval=2", "--warmup_steps=5", FULL_VOCAB)
    capsys.readouterr()
    train.main(args)
    printed = capsys.readouterr().out
    assert "warning: warmup_steps (5) >= max_steps (3)" in printed  # printed before the run, too
    assert re.search(r"^step +0/3 \| loss [\d.]+ \| .* \| elapsed \d+s \| eta \d+s \| mfu n/a$", printed, re.MULTILINE)
    elapsed = [m["elapsed_s"] for m in read_metrics(out) if "loss" in m]
    assert len(elapsed) == 3 and 0 < elapsed[0] < elapsed[1] < elapsed[2]
    summary = printed[printed.index("run finished at step 3/3 in "):]
    assert "tokens seen: 768 (3 steps of 256)" in summary
    vals = [(m["step"], m["val_loss"]) for m in read_metrics(out) if "val_loss" in m]  # steps 0, 2, 3
    best_step, best = min(vals, key=lambda v: v[1])
    kept = f"{out}/best_{best_step:06d}.pt" if best_step else "no checkpoint kept at that step"
    assert f"val loss: final {vals[-1][1]:.4f} (step 3), best {best:.4f} (step {best_step}, {kept})" in summary
    assert f"out_dir: {out}" in summary
    # the commands as printed, from this folder: plot in a process of its own (the interpreter's path runs),
    # sample and export through their main() in this one (no second torch start-up)
    plot = subprocess.run(summary_command(summary, "plot"), capture_output=True, text=True, timeout=300)
    assert plot.returncode == 0, plot.stderr
    with open(os.path.join(out, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for name, check in (("sample", f"loaded {out}/ckpt_000003.pt"), ("export", f"exported {out}/ckpt_000003.pt to ")):
        argv = summary_command(summary, name)
        script = f"{'export_hf' if name == 'export' else name}.py"
        assert os.path.samefile(argv[1], os.path.join(ROOT, "scripts", script))
        module = importlib.import_module(f"scripts.{os.path.splitext(os.path.basename(argv[1]))[0]}")
        capsys.readouterr()
        assert module.main(argv[2:]) == 0
        assert check in "".join(capsys.readouterr())
    assert os.path.isfile(os.path.join(out, "hf", "model.safetensors"))
    again = summary_command(summary, "continue")
    assert again[1] == "train.py" and again[-2:] == ["--resume=auto", "--max_steps=6"]
    train.main(again[2:])  # in this process: the same flags, resumed at step 3
    printed = capsys.readouterr().out
    assert f"resumed from {out}/ckpt_000003.pt at step 3" in printed and "run finished at step 6/6" in printed


def test_eta_counts_from_the_first_logged_step(monkeypatch):
    """The first step (with the evaluation before it, or compilation) is slow: the ETA uses its own time
    only until the mean over later steps exists."""
    from gpt2_pretrain import logging as logger

    clock = iter([100.0, 130.0, 134.0])
    monkeypatch.setattr(logger.time, "time", lambda: next(clock))
    progress = logger.Progress(run_started=40.0, max_steps=10)
    assert progress.at(0, step_seconds=2.0) == {"elapsed_s": 60.0, "eta_s": 18.0}  # 9 steps left at 2 s
    assert progress.at(1, step_seconds=30.0) == {"elapsed_s": 90.0, "eta_s": 240.0}  # 30 s since step 0, 8 left
    assert progress.at(3, step_seconds=1.0) == {"elapsed_s": 94.0, "eta_s": 68.0}  # (134 - 100) / 3 s, 6 left


def test_a_run_stopped_by_a_signal_ends_with_the_summary(token_dir, tmp_path, capsys, monkeypatch, one_thread):
    from gpt2_pretrain.logging import Progress

    at = Progress.at

    def at_then_sigterm(self, step, step_seconds):  # as if the job were preempted after step 1
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return at(self, step, step_seconds)

    monkeypatch.setattr(Progress, "at", at_then_sigterm)
    out = str(tmp_path / "run")
    capsys.readouterr()
    train.main(tiny_args(token_dir, out, "--max_steps=50", "--eval_interval=100"))
    printed = capsys.readouterr().out
    summary = printed[printed.index("run stopped by SIGTERM at step 2/50 in "):]
    assert "tokens seen: 512 (2 steps of 256)" in summary
    assert "val loss: last " in summary and "val loss: final" not in summary  # a stopped run has more to come
    assert summary_command(summary, "continue")[-2:] == ["--resume=auto", "--max_steps=50"]  # its own end
    assert summary_command(summary, "export")[2] == f"{out}/ckpt_000002.pt"


@pytest.mark.slow  # starts a Python process that imports torch: about 4 s each on the 2-core box
def test_bench_prints_tokens_per_second_on_a_tiny_config(tmp_path):
    result = run_python(["scripts/bench.py", *TINY_MODEL, "--device=cpu", "--batch_size=4",
                         "--total_batch_size=256", "--bench_steps=2", "--bench_warmup=1", "--bench_compile=off"])
    assert result.returncode == 0, result.stderr
    match = re.search(r"tokens/step \| step [\d.]+ ms \| tokens/s ([\d,]+) \| mfu n/a", result.stdout)
    assert match and int(match.group(1).replace(",", "")) > 0, result.stdout
    bad = run_python(["scripts/bench.py", "--batch_sise=4"])
    assert bad.returncode == 2 and "Did you mean 'batch_size'" in bad.stderr and "Traceback" not in bad.stderr


def test_dry_run_on_a_cpu_speaks_of_the_cpu(token_dir, capsys, monkeypatch):
    """--device=cpu: memory against this machine's RAM and no GPU times; --device=cuda: the GPU estimates."""
    from gpt2_pretrain import dry_run as dry_run_module

    monkeypatch.setattr(dry_run_module, "available_ram", lambda: 2**20)  # 1 MiB free: less than any model needs
    code, out, _ = dry_run(capsys, f"--data_dir={token_dir}", "--device=cpu")
    assert code == 0 and "H100" not in out and "A100" not in out and "GPU memory" not in out
    assert re.search(r"CPU memory per process .* total [\d.]+ GiB; peak with margin \(x[\d.]+ \+ [\d.]+ GiB\) "
                     r"[\d.]+ GiB; 1 process on this machine: [\d.]+ GiB of 0.00 GiB RAM available now", out)
    assert "warning: the estimate" in out and "more than the RAM available" in out
    assert "time per step on this CPU: not estimated" in out and "scripts/bench.py" in out
    code, out, _ = dry_run(capsys, f"--data_dir={token_dir}", "--device=cuda")
    assert code == 0 and "time per step at 45% MFU on 1x H100" in out and "CPU memory" not in out
