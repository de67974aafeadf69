"""scripts/gpu_check.py: its --tiny run does every part on CPU, in a Python where `import wandb` and `import
datasets` fail as on the GPU image, and writes the report the GPU run writes; a failing or hanging part is
reported and the check goes on."""

import ast
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, run_python

# a sitecustomize on PYTHONPATH: every Python started with it (and its children) cannot import these
BLOCKER = """import sys


class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED}:
            raise ImportError(f"No module named {name!r} (blocked for this test)")
        return None


sys.meta_path.insert(0, Blocked())
"""
PARTS = ["environment", "bench_adamw_ddp", "bench_muon_ddp", "bench_adamw_fsdp", "bench_muon_fsdp", "bench_full_logits",
         "test_cuda", "prepare", "run", "resume", "precision_ddp", "precision_fsdp",
         "bench_activation_checkpointing", "bench_coordinate_descent", "hellaswag", "bench_max_autotune"]
CUDA_ONLY = ("first_step_peak_allocated", "first_step_peak_reserved", "steady_peak_allocated", "steady_peak_reserved",
             "alloc_retries", "memory_snapshot", "memory_snapshot_bytes")


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "scripts", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def blocking_env(tmp_path, modules):
    """Environment for a Python (and its children) in which `modules` cannot be imported."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER.replace("{BLOCKED}", repr(tuple(modules))))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))}


def tiny_bench_estimate():
    """Bytes gpu_check --tiny's benches should report as the dry run's estimate: memory_estimate, float32 on a CPU."""
    from config import load_config
    from gpt2_pretrain.dry_run import memory_estimate, meta_model
    from train import model_config

    gpu_check = load_gpu_check()
    size = gpu_check.SIZES["tiny"]
    config = load_config([*size["model"], "--batch_size=4", f"--total_batch_size={size['bench_total_batch_size']}",
                          "--sample_tokens=0", *size["bench_extra"]])
    n_params = meta_model(model_config(config)).num_params()
    return sum(memory_estimate(config, n_params, bf16=False, device_type="cpu").values())


def cuda_test_names():
    with open(os.path.join(ROOT, "tests", "test_cuda.py")) as f:
        tree = ast.parse(f.read())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


@pytest.mark.slow
def test_tiny_check_runs_every_part_without_wandb_or_datasets(tmp_path):
    env = blocking_env(tmp_path, ["wandb", "datasets"])
    check = run_python(["-c", "import wandb"], env=env)
    assert check.returncode != 0 and "blocked for this test" in check.stderr
    out = tmp_path / "report"
    result = run_python(["scripts/gpu_check.py", "--tiny", "--out", str(out)], timeout=3600, env=env)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]

    report = json.loads((out / "gpu_check.json").read_text())
    assert {"started", "commit", "tiny", "command", "total_seconds", "wall_seconds", "ok", "failed", "environment",
            "parts"} <= set(report)
    assert report["ok"] and report["failed"] == [] and report["tiny"]
    parts = {part["name"]: part for part in report["parts"]}
    assert [part["name"] for part in report["parts"]] == PARTS
    assert {name: part["status"] for name, part in parts.items()} == {
        **{name: "passed" for name in PARTS}, "test_cuda": "skipped"}
    for part in report["parts"]:
        assert {"budget_seconds", "timeout_seconds", "seconds", "command", "returncode", "detail"} <= set(part)
    environment = report["environment"]
    assert environment["torch"] == torch.__version__ and environment["device"] == "cpu"
    assert environment["wandb_importable"] is False and environment["datasets_importable"] is False

    tests = parts["test_cuda"]["results"]["tests"]
    assert {test["name"].split("[")[0] for test in tests} == cuda_test_names()  # every GPU test, one row each
    assert all(test["outcome"] == "skipped" for test in tests)
    bench = [parts[f"bench_{optimizer}_{parallel}"]["results"] for optimizer in ("adamw", "muon")
             for parallel in ("ddp", "fsdp")]
    assert [(b["optimizer"], b["parallel"]) for b in bench] == [("adamw", "ddp"), ("adamw", "fsdp"),
                                                                 ("muon", "ddp"), ("muon", "fsdp")]
    estimate = tiny_bench_estimate()
    variants = {name: parts[name]["results"] for name in PARTS
                if name.startswith("bench_") and name != "bench_activation_checkpointing"}
    for name, b in variants.items():
        assert b["tokens_per_sec"] > 0 and b["memory_gib"] > 0 and b["complete"]
        assert b["dry_run_estimate_gib"] == estimate / 2**30  # dry_run.memory_estimate for the tiny config
        (run,) = b["runs"]  # --tiny: compile off only
        assert run["compile"] is False and b["compile_off_mfu"] is None
        assert [step["phase"] for step in run["steps"]] == ["first", "timed", "timed"] + (
            ["without_host_read"] * 2 if name.startswith("bench_muon") else [])
        assert all(step["seconds"] > 0 for step in run["steps"]) and run["first_step_seconds"] > 0
        assert {key: run[key] for key in CUDA_ONLY} == dict.fromkeys(CUDA_ONLY)  # CPU: none of CUDA's figures
        assert run["graphs"] == run["graph_breaks"] == 0 and run["compile_seconds"] is None  # nothing compiled
        assert run["loss"] == ("full" if name == "bench_full_logits" else "chunked")
        assert run["inductor_options"] == {"coordinate_descent_tuning": name in ("bench_coordinate_descent",
                                                                                 "bench_max_autotune"),
                                           "max_autotune": name == "bench_max_autotune"}
        assert (run["step_ms_without_host_read"] > 0) if name.startswith("bench_muon") else (
            run["step_ms_without_host_read"] is None)  # muon only: adamw skips a NaN step on the device
    # activation checkpointing: one process a setting, the batch from --batch_size=auto (256 tokens a step of
    # 64-token rows: at most 4), the estimate's saved activations falling with full checkpointing
    checkpointing = parts["bench_activation_checkpointing"]["results"]["runs"]
    assert [run["activation_checkpointing"] for run in checkpointing] == ["none", "full"]
    assert all(run["complete"] and run["batch_size"] == 4 and run["memory_bytes"] > 0 for run in checkpointing)
    none, full = (run["dry_run_estimate"]["activations"] for run in checkpointing)
    assert full < none
    assert parts["hellaswag"]["results"]["batched_examples_per_sec"] > 0
    assert parts["hellaswag"]["results"]["same_scores"] is True  # float32 on CPU: both scorers agree exactly
    run, resume = parts["run"]["results"], parts["resume"]["results"]
    assert run["last_loss"] < run["first_loss"] and run["hellaswag_acc_norm"] and run["val_loss"]
    assert resume["resumed_at"] == 10 and resume["steps"] == 2
    precision = parts["precision_fsdp"]["results"]
    assert precision["ddp_losses"] == parts["precision_ddp"]["results"]["losses"] and len(precision["losses"]) == 20
    # on a CPU both keep float32 weights (no bf16 policy): only the order of a few float32 sums differs
    assert precision["max_loss_gap"] < 1e-3

    markdown = (out / "gpu_check.md").read_text()
    for heading in ("## tests/test_cuda.py", "## scripts/bench.py", "## Real run and resume", "## HellaSwag throughput",
                    "## ddp against fsdp (mixed precision)"):
        assert heading in markdown
    assert "torch " + torch.__version__ in markdown and "all parts passed" in markdown
    assert "Not a CUDA device: the CUDA-only figures" in markdown and "Muon's host read" in markdown
    log = (out / "gpu_check.log").read_text()
    assert all(f"===== {name} " in log for name in PARTS)
    assert (out / "test_cuda.xml").is_file()


@pytest.mark.slow
def test_failing_and_hanging_parts_are_reported_and_stopped(tmp_path):
    gpu_check = load_gpu_check()
    check = gpu_check.Check(str(tmp_path), tiny=True, work=str(tmp_path))
    with open(tmp_path / "log", "w") as log:
        failed = gpu_check.run_part(check, "fails", 5, [sys.executable, "-c", "raise SystemExit(3)"],
                                    gpu_check.parse_json, 30, log)
        # the part starts a grandchild that would outlive it: the timeout stops the whole group
        started, survived = tmp_path / "started", tmp_path / "survived"
        (tmp_path / "late.py").write_text(f"import time\nopen({str(started)!r}, 'w').close()\ntime.sleep(6)\n"
                                          f"open({str(survived)!r}, 'w').close()\n")
        # it prints what a bench prints before its first timed step: the report keeps those figures
        progress = [{"progress": "setup", "compile": True, "seconds": 1.5},
                    {"progress": "step", "compile": True, "phase": "first", "step": 0, "seconds": 40.0}]
        (tmp_path / "hang.py").write_text(f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, "
                                          f"{str(tmp_path / 'late.py')!r}])\n"
                                          + "".join(f"print({json.dumps(line)!r}, flush=True)\n" for line in progress)
                                          + "time.sleep(60)\n")
        hung = gpu_check.run_part(check, "hangs", 1, [sys.executable, str(tmp_path / "hang.py")],
                                  gpu_check.parse_bench, 5, log)
    assert failed["status"] == "failed" and failed["returncode"] == 3
    assert hung["status"] == "timed out" and hung["returncode"] is None and hung["seconds"] < 30
    assert hung["results"] == {"complete": False, "runs": [{"compile": True, "complete": False, "setup_seconds": 1.5,
                                                            "steps": [{"phase": "first", "step": 0, "seconds": 40.0}]}]}
    assert started.exists()  # the grandchild ran, and 6 s after its start it would have written `survived`
    time.sleep(7)
    assert not survived.exists()
    assert "===== fails " in (tmp_path / "log").read_text()


@pytest.mark.slow  # starts a Python process that imports torch: about 4 s each on the 2-core box
def test_unknown_part_and_missing_out_are_one_error_line(tmp_path):
    for args in (["--out", str(tmp_path), "--parts", "bench,run"], []):
        result = subprocess.run([sys.executable, "scripts/gpu_check.py", *args], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1


@pytest.mark.slow  # starts Python processes that import torch
def test_a_python_without_pytest_gets_one_line_in_the_report(tmp_path):
    out = tmp_path / "report"
    result = run_python(["scripts/gpu_check.py", "--tiny", "--parts", "test_cuda", "--out", str(out)],
                        env=blocking_env(tmp_path, ["pytest"]), timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    parts = {part["name"]: part for part in json.loads((out / "gpu_check.json").read_text())["parts"]}
    assert parts["environment"]["status"] == "passed"  # the rest of the check still runs
    assert parts["test_cuda"]["status"] == "failed"
    assert parts["test_cuda"]["detail"].startswith("pytest is not installed in this Python")
    assert "pytest is not installed" in (out / "gpu_check.md").read_text()


def test_budgets_fit_the_total_and_a_stopped_test_run_names_its_test(tmp_path):
    gpu_check = load_gpu_check()
    parts = gpu_check.plan(gpu_check.Check(str(tmp_path), tiny=False, work=str(tmp_path)))
    assert [name for name, *_ in parts] == PARTS
    kept = [budget for name, budget, *_ in parts if name not in gpu_check.TAIL]
    assert sum(kept) <= gpu_check.TOTAL_SECONDS - 10  # 10 s for this script's own work between parts and after them
    # a part may use what the parts after it leave; a TAIL part only what is left, at most its budget
    assert gpu_check.timeout_for("run", 55, remaining=300, later=100) == 200
    assert gpu_check.timeout_for("run", 55, remaining=300, later=280) == 55
    assert gpu_check.timeout_for("run", 55, remaining=30, later=0) == 30
    assert gpu_check.timeout_for("hellaswag", 25, remaining=300, later=0) == 25
    assert gpu_check.timeout_for("bench_max_autotune", None, remaining=140, later=0) == 140

    output = ("tests/test_cuda.py::test_a PASSED                     [ 25%]\n"
              "tests/test_cuda.py::test_b[muon] some output of the test\n"
              "FAILED                                                  [ 50%]\n"
              "tests/test_cuda.py::test_c SKIPPED (needs a CUDA GPU)    [ 75%]\n"
              "tests/test_cuda.py::test_d[adamw] ")  # stopped here: no junit file was written
    results = gpu_check.parse_tests(output, gpu_check.Check(str(tmp_path), tiny=False, work=str(tmp_path)))
    assert [(test["name"], test["outcome"]) for test in results["tests"]] == [
        ("test_a", "passed"), ("test_b[muon]", "failed"), ("test_c", "skipped"), ("test_d[adamw]", "running")]
    assert results["running_when_stopped"] == "test_d[adamw]" and results["source"] == "pytest -v output"
