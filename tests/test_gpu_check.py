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
PARTS = ["environment", "prepare", "dry_run", "hellaswag", "test_cuda", "bench_adamw_ddp", "bench_muon_ddp",
         "bench_adamw_fsdp", "bench_muon_fsdp", "run", "resume", "precision_ddp", "precision_fsdp"]


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
    for b in bench:
        assert b["tokens_per_sec"] > 0 and b["memory_gib"] > 0
        assert b["dry_run_estimate_gib"] == parts["dry_run"]["results"][f"{b['parallel']}_estimate_gib"] >= 0
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
        (tmp_path / "hang.py").write_text(f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, "
                                          f"{str(tmp_path / 'late.py')!r}])\ntime.sleep(60)\n")
        hung = gpu_check.run_part(check, "hangs", 1, [sys.executable, str(tmp_path / "hang.py")],
                                  gpu_check.parse_json, 5, log)
    assert failed["status"] == "failed" and failed["returncode"] == 3
    assert hung["status"] == "timed out" and hung["returncode"] is None and hung["seconds"] < 30
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
