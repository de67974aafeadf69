"""Check the GPU path in one call of at most 8 minutes on one H100, ordered around its goal (GPT-2 124M at 45%
MFU): the machine, then the MFU benchmarks that explain their numbers (compile on and off, compile seconds,
Dynamo graphs and breaks, first-step and steady memory, the dry run's estimate, a memory snapshot) and their
variants, the GPU tests one by one, a short real run with a resume, ddp against fsdp's mixed precision, then
what time is left for the slow variants; all written to one report (markdown and JSON).

    python scripts/gpu_check.py --out out/gpu_check        # on one GPU (make gpu-check runs this)
    python scripts/gpu_check.py --tiny --out /tmp/check    # every part on CPU with a tiny model
    python scripts/gpu_check.py --out DIR --parts bench_adamw_ddp,run   # some parts (and what they need)

Each part is a subprocess with a time budget in seconds (BUDGETS: an estimate for one H100 with a margin);
time a part leaves unused goes to the later ones. The last parts (TAIL) have no time kept for them: they run
in what is left. A part that fails or runs out of time is reported, with the figures it printed before, and
the check goes on. All parts share one compile cache. Written to DIR: gpu_check.md, gpu_check.json,
gpu_check.log (every part's command and output), test_cuda.xml (the GPU tests' junit) and on a GPU
memory_snapshot.pickle (one compiled step). Exit status 1 if any part failed or ran out of time. It needs
torch, numpy, tiktoken and safetensors only (pytest and pytest-timeout for the GPU tests): wandb and
datasets are not used.
"""

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpt2_pretrain.flops import format_mfu  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_SECONDS = 480  # the whole check: 8 min, of the device's 10-min command (start-up and the copy back outside it)
# Seconds per part on one H100: an estimate (e) with a margin, none yet measured on this code (the figures the
# estimates use and their sources: docs/gpu_check.md#budgets). Python with torch and CUDA starts in ~6 s; a cold
# compile of the 124M training step ~45 s, a warm one (inductor's FX graph cache) ~12 s; a compiled step of
# 2^19 tokens ~1.15 s, an uncompiled one ~1.4 s (docs/benchmarks.md, H100). The parts before TAIL sum to 467.
BUDGETS = {
    "environment": 10,  # e 4: a Python start and nvidia-smi
    "bench_adamw_ddp": 88,  # e 65: compiled (start 6, cold compile 45, 5 steps, snapshot), uncompiled (start 6, 4 steps)
    "bench_muon_ddp": 45,  # e 35: compiled (start 6, warm compile 12, 7 steps, 3 without the host read), uncompiled 12
    "bench_adamw_fsdp": 50,  # e 40: compiled (start 6, fsdp's graphs, kernels cached: 15, 4 steps), uncompiled 12
    "bench_muon_fsdp": 35,  # e 30: compiled (start 6, warm compile 10, 4 steps), uncompiled 12
    "bench_full_logits": 40,  # e 30: compiled only (start 6, a new loss graph, the blocks' kernels cached: 18, 4 steps)
    "test_cuda": 70,  # e 60: 8 tests on tiny models (3 start processes: torchrun, a killed run and its resume)
    "prepare": 10,  # e 4: the Shakespeare plays on 8 workers
    "run": 55,  # e 45: start 6, the training graph warm 12, eval and HellaSwag graphs 10 each, 20 steps, 2 checkpoints
    "resume": 40,  # e 32: the same graphs warm, 10 steps, a checkpoint
    "precision_ddp": 12,  # e 9: start 6, 20 uncompiled steps of 16 x 1024 tokens, a checkpoint
    "precision_fsdp": 12,  # e 9
    # TAIL: no time kept for these; each runs in what the parts above left, at most its budget (None: all of it)
    "bench_activation_checkpointing": 120,  # e 100: 6 uncompiled processes (start 6, 3 steps of 2^17 tokens)
    "bench_coordinate_descent": 90,  # e 60: a new compile (tuning options change every kernel) and the tuning itself
    "hellaswag": 25,  # e 15: 128 examples, 3 rounds, the scoring graph compiled once
    "bench_max_autotune": None,  # e 150+: autotunes every matmul shape; last, so whatever it does costs nothing else
}
TAIL = ("bench_activation_checkpointing", "bench_coordinate_descent", "hellaswag", "bench_max_autotune")
TEST_TIMEOUT = 40  # seconds per GPU test (pytest-timeout): a hang names its test and the others still run
BENCH_RUNS = [("adamw", "ddp"), ("muon", "ddp"), ("adamw", "fsdp"), ("muon", "fsdp")]  # compiled and not, each
# MFU variants of adamw + ddp, compiled only: (part, bench.py flags). The first at its place in the order, the
# others at the end (TAIL).
BENCH_VARIANTS = [
    ("bench_full_logits", ["--bench_loss=full"]),  # F.cross_entropy on full logits: 41.5% at 126b8cb
    ("bench_coordinate_descent", ["--bench_coordinate_descent"]),
    ("bench_max_autotune", ["--bench_mode=max-autotune-no-cudagraphs"]),
]
# bench_activation_checkpointing (first in TAIL): each --activation_checkpointing at 124M and at an XL-shaped model
# with fewer layers (fsdp), the micro-batch from --batch_size=auto, uncompiled (each setting is another graph to
# compile): peak memory against the dry run's estimate and the step time of each, one bench process a setting.
SIZES = {
    "gpu": dict(device="cuda", compile=True, model=["configs/gpt2_124m.py"], bench_total_batch_size=2**19,
                bench_steps=3, bench_warmup=1, run_total_batch_size=65536, learning_rate=6e-4, warmup_steps=5,
                bench_compile="both", max_steps=20, resume_steps=30, eval_iters=2,
                sample_tokens=16, loss_drop=1.0, examples=128,
                rounds=3, hellaswag_model=["--n_layer", "12", "--n_head", "12", "--n_embd", "768", "--block_size", "1024"],
                val_tokens=100_000, plays=None, workers=8, bench_extra=[], precision_batch_size=16,
                precision_total_batch_size=16384, precision_max_loss_gap=0.1,
                ac_models=[["configs/gpt2_124m.py"], ["configs/gpt2_xl_fsdp.py", "--n_layer=6"]],
                ac_modes=("none", "selective", "full"), ac_total_batch_size=2**17),
    "tiny": dict(device="cpu", compile=False, model=["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=64"],
                 bench_total_batch_size=256, bench_steps=2, bench_warmup=1, bench_compile="off", run_total_batch_size=256,
                 learning_rate=3e-3, warmup_steps=2, max_steps=10, resume_steps=12, eval_iters=1, sample_tokens=4,
                 loss_drop=0.3, examples=4, rounds=1,
                 hellaswag_model=["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "64"],
                 val_tokens=5_000, plays=["comedy_of_errors.txt", "cymbeline.txt"], workers=1,
                 bench_extra=["--vocab_size=128"], precision_batch_size=4, precision_total_batch_size=256,
                 precision_max_loss_gap=0.1, ac_models=[[]], ac_modes=("none", "full"), ac_total_batch_size=256),
}
TINY_BUDGET = 600  # seconds per part in --tiny mode: a cap for a CPU shared with other work (no compilation)
HELLASWAG_WORDS = ("a man woman child dog is are runs walks jumps throws catches the ball into water kitchen table "
                   "then picks up knife cuts slowly quickly camera smiles while people watch from side of road "
                   "holding rope climbs wall").split()


class Check:
    """The parts, their sizes and folders, and what each part found."""

    def __init__(self, out, tiny, work):
        self.out, self.tiny, self.work = out, tiny, work
        self.size = SIZES["tiny" if tiny else "gpu"]
        self.tokens, self.run_dir = os.path.join(work, "tokens"), os.path.join(work, "run")
        self.hellaswag_path = os.path.join(work, "hellaswag_val.jsonl")
        self.parts = {}  # name -> the part's record for the report
        # one compile cache for every part: inductor's FX graph and autograd caches and Triton's kernels, so a
        # part that compiles a graph an earlier one compiled reads it back
        self.cache = os.path.join(work, "compile_cache")
        self.env = {"PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_CACHE_DIR": self.cache,
                    "TRITON_CACHE_DIR": os.path.join(self.cache, "triton"), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
                    "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}

    def train_args(self, *extra):
        s = self.size
        return [*s["model"], f"--device={s['device']}", f"--compile={s['compile']}", "--wandb_mode=disabled", *extra]


def write_hellaswag(path, n, seed=0):
    """n examples in the official val format (ctx, 4 endings, label and the other fields). Every row (context and
    ending) stays under 64 tokens, one padded length: a compiled model compiles its scoring graph once."""
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(HELLASWAG_WORDS) for _ in range(rng.randint(lo, hi)))

    with open(path, "w") as f:
        for index in range(n):
            ctx_a, ctx_b = text(8, 24), text(2, 6)
            f.write(json.dumps({"ind": index, "activity_label": "Synthetic", "ctx_a": ctx_a, "ctx_b": ctx_b,
                                "ctx": f"{ctx_a} {ctx_b}", "split": "val", "split_type": "indomain",
                                "label": rng.randrange(4), "endings": [text(4, 14) for _ in range(4)],
                                "source_id": f"synthetic~{index}"}) + "\n")


def environment():
    """The machine: device, driver, torch, CUDA, cuDNN, Python, CPU, and whether wandb/datasets are importable."""
    import importlib.util

    import torch

    def importable(name):
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "hostname": socket.gethostname(), "cpu_count": os.cpu_count(), "cpu": platform.processor() or None,
            "wandb_importable": importable("wandb"), "datasets_importable": importable("datasets"),
            "cuda_available": torch.cuda.is_available(), "device": "cpu", "driver": None, "cudnn": None}
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = names[0] if names else info["cpu"]
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(device=properties.name, device_count=torch.cuda.device_count(),
                    memory_gib=round(properties.total_memory / 2**30, 1), multiprocessors=properties.multi_processor_count,
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    cudnn=torch.backends.cudnn.version())
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            info["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def last_json(output):
    """The last line of output that is a JSON object."""
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


VERBOSE_TEST = re.compile(r"^tests/test_cuda\.py::(\S+)(?: (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b)?")
# an outcome alone on a line: what pytest -v writes when the test's own output came between its name and outcome
LATE_OUTCOME = re.compile(r"^(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS) +\[")
OUTCOMES = {"PASSED": "passed", "FAILED": "failed", "SKIPPED": "skipped", "ERROR": "error", "XFAIL": "skipped",
            "XPASS": "passed"}


def tests_from_junit(path):
    tests = []
    for case in ElementTree.parse(path).iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            element = case.find(kind)
            if element is not None:
                outcome, message = {"failure": "failed"}.get(kind, kind), (element.get("message") or "")[:500]
        tests.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                      "message": message})
    return tests


def tests_from_verbose(output):
    """pytest -v's lines: each test's name as it starts, its outcome when it ends; a name with no outcome is the
    test that was running when the part was stopped."""
    tests = []
    for line in output.splitlines():
        match, late = VERBOSE_TEST.match(line), LATE_OUTCOME.match(line)
        running = tests and tests[-1]["outcome"] == "running"
        if match and running and tests[-1]["name"] == match.group(1):
            tests[-1]["outcome"] = OUTCOMES.get(match.group(2), "running")
        elif match:
            tests.append({"name": match.group(1), "outcome": OUTCOMES.get(match.group(2), "running"),
                          "seconds": None, "message": ""})
        elif late and running:
            tests[-1]["outcome"] = OUTCOMES[late.group(1)]
    return tests


def parse_tests(output, check):
    """The GPU tests from pytest's junit file, or from its -v output where the part was stopped before pytest
    wrote the file: then the test it was running is named."""
    junit = os.path.join(check.out, "test_cuda.xml")
    tests = tests_from_junit(junit) if os.path.isfile(junit) else tests_from_verbose(output)
    counts = {outcome: sum(t["outcome"] == outcome for t in tests)
              for outcome in ("passed", "failed", "error", "skipped")}
    if not tests:
        raise ValueError("no tests in the junit xml or in pytest's -v output")
    running = [t["name"] for t in tests if t["outcome"] == "running"]
    return {"tests": tests, **counts, "running_when_stopped": running[0] if running else None,
            "per_test_timeout": None if missing_module("pytest_timeout") else TEST_TIMEOUT,
            "source": "junit" if os.path.isfile(junit) else "pytest -v output"}


def bench_runs(output):
    """scripts/bench.py --bench_json's lines, one record per process (compile on, compile off): its setup
    seconds, each step's seconds as it ran, and once it finished its result (complete)."""
    runs = []
    for line in output.splitlines():
        if not line.startswith("{"):
            continue
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if data.get("progress") == "setup":
            runs.append({"compile": data["compile"], "complete": False, "setup_seconds": data["seconds"], "steps": []})
        elif "progress" in data and runs:
            runs[-1]["steps"].append({key: data[key] for key in ("phase", "step", "seconds")})
        elif "step_ms" in data and runs:
            runs[-1].update(data, complete=True, memory_gib=data["memory_bytes"] / 2**30,
                            dry_run_estimate_gib=data["dry_run_estimate_bytes"] / 2**30)
    return runs


SUMMARY = ("optimizer", "parallel", "device", "compile", "loss", "batch_size", "block_size", "tokens_per_step",
           "step_ms", "tokens_per_sec", "mfu", "memory_kind", "memory_gib", "dry_run_estimate_gib")


def parse_bench(output, check):
    """Every bench run of the part, finished or not; the first finished one's figures at the top (the compiled
    one on a GPU) and the uncompiled one's beside them."""
    runs = bench_runs(output)
    if not runs:
        raise ValueError("no JSON line from scripts/bench.py in the output")
    done = [run for run in runs if run["complete"]]
    results = {"runs": runs, "complete": len(done) == len(runs)}
    if done:
        results.update({key: done[0][key] for key in SUMMARY})
        off = [run for run in done if not run["compile"]]
        results["compile_off_mfu"] = off[0]["mfu"] if off and done[0]["compile"] else None
    return results


def parse_json(output, check):
    return last_json(output)


def parse_prepare(output, check):
    with open(os.path.join(check.tokens, "manifest.json")) as f:
        shards = json.load(f)["shards"]
    return {"shards": len(shards), "tokens": sum(shard["tokens"] for shard in shards)}


def train_losses(metrics):
    return [(m["step"], m["loss"]) for m in metrics if "loss" in m]


def parse_run(output, check):
    metrics = read_metrics(check.run_dir)
    losses = [loss for _, loss in train_losses(metrics)]
    if not losses or not all(math.isfinite(loss) for loss in losses):
        raise ValueError(f"train losses missing or not finite: {losses}")
    last = statistics.mean(losses[-3:])
    if not last < losses[0] - check.size["loss_drop"]:
        raise ValueError(f"the loss did not fall by {check.size['loss_drop']}: first {losses[0]:.3f}, last three {last:.3f}")
    checkpoint = os.path.join(check.run_dir, f"ckpt_{check.size['max_steps']:06d}.pt")
    if not os.path.isfile(checkpoint):
        raise ValueError(f"no checkpoint {checkpoint}")
    hellaswag = [m["hellaswag_acc_norm"] for m in metrics if "hellaswag_acc_norm" in m]
    if not hellaswag:
        raise ValueError("no hellaswag_acc_norm in metrics.jsonl")
    timed = [m for m in metrics if "tokens_per_sec" in m][3:]  # past compilation and warm-up
    return {"first_loss": losses[0], "last_loss": losses[-1], "steps": len(losses),
            "val_loss": [m["val_loss"] for m in metrics if "val_loss" in m], "hellaswag_acc_norm": hellaswag,
            "tokens_per_sec": statistics.median(m["tokens_per_sec"] for m in timed) if timed else None,
            "mfu": statistics.median(m["mfu"] for m in timed) if timed and timed[0]["mfu"] is not None else None,
            "checkpoint_gib": os.path.getsize(checkpoint) / 2**30}


def parse_resume(output, check):
    resumed = re.search(r"resumed from (\S+) at step (\d+)", output)
    expected = check.size["max_steps"]
    if not resumed or int(resumed.group(2)) != expected:
        raise ValueError(f"expected 'resumed from ... at step {expected}' in the output")
    losses = train_losses(read_metrics(check.run_dir))
    steps = [step for step, _ in losses]
    if steps != list(range(check.size["resume_steps"])):
        raise ValueError(f"metrics.jsonl steps are not 0..{check.size['resume_steps'] - 1} in order: {steps}")
    first, at_resume = losses[0][1], losses[expected][1]
    if not at_resume < first - check.size["loss_drop"]:
        raise ValueError(f"the resumed loss {at_resume:.3f} is not below the first {first:.3f}: weights not restored?")
    return {"resumed_at": expected, "loss_at_resume": at_resume, "last_loss": losses[-1][1],
            "steps": len(losses) - expected}


PRECISION_STEPS = 20  # ddp against fsdp: steps of each


def parse_precision(output, check, parallel):
    """The run's losses (finite, PRECISION_STEPS of them); fsdp's also against ddp's, step by step."""
    losses = [loss for _, loss in train_losses(read_metrics(os.path.join(check.work, f"precision_{parallel}")))]
    if len(losses) != PRECISION_STEPS or not all(math.isfinite(loss) for loss in losses):
        raise ValueError(f"expected {PRECISION_STEPS} finite train losses, got {losses}")
    results = {"losses": losses}
    if parallel == "fsdp":
        ddp = check.parts["precision_ddp"]["results"]["losses"]
        gaps = [abs(a - b) for a, b in zip(ddp, losses)]
        results.update(ddp_losses=ddp, max_loss_gap=max(gaps), last_loss_gap=losses[-1] - ddp[-1])
        if max(gaps) > check.size["precision_max_loss_gap"]:
            raise ValueError(f"fsdp's loss is {max(gaps):.4f} from ddp's at some step (more than "
                             f"{check.size['precision_max_loss_gap']}): see docs/distributed.md#mixed-precision")
    return results


def plan(check):
    """[(name, budget seconds, prerequisite parts, command, parse)] in running order: the machine, the MFU
    benchmarks, the GPU tests, the real run and its resume, ddp against fsdp, then TAIL in what time is left."""
    s, python = check.size, sys.executable
    source = "data/shakespeare"
    if s["plays"]:
        source = os.path.join(check.work, "source")
        os.makedirs(source, exist_ok=True)
        for play in s["plays"]:
            shutil.copy(os.path.join(ROOT, "data", "shakespeare", play), source)
    batch = f"--batch_size={4 if check.tiny else 64}"
    # no samples: the tiny vocab is below the tokenizer's, and a benchmark samples nothing anyway
    bench_batch = [batch, f"--total_batch_size={s['bench_total_batch_size']}", "--sample_tokens=0", *s["bench_extra"]]
    snapshot = os.path.join(check.out, "memory_snapshot.pickle")

    def bench(optimizer, parallel, compile_setting, *flags):
        return [python, "scripts/bench.py", *check.train_args(*bench_batch, f"--optimizer={optimizer}",
                                                              f"--parallel={parallel}"),
                f"--bench_compile={compile_setting}", f"--bench_steps={s['bench_steps']}",
                f"--bench_warmup={s['bench_warmup']}", "--bench_json", *flags]

    parts = [("environment", [], [python, os.path.abspath(__file__), "--environment"], parse_json)]
    for optimizer, parallel in BENCH_RUNS:
        flags = ["--bench_muon_sync"] if optimizer == "muon" else []
        if (optimizer, parallel) == ("adamw", "ddp"):
            flags.append(f"--bench_memory_snapshot={snapshot}")  # one snapshot: of the first, main configuration
        parts.append((f"bench_{optimizer}_{parallel}", [], bench(optimizer, parallel, s["bench_compile"], *flags),
                      parse_bench))
    variants = [(name, [], bench("adamw", "ddp", "on" if s["compile"] else "off", *flags), parse_bench)
                for name, flags in BENCH_VARIANTS]
    parts.append(variants[0])
    test_timeout = [] if missing_module("pytest_timeout") else [f"--timeout={TEST_TIMEOUT}"]
    parts.append(("test_cuda", [], [python, "-m", "pytest", "-v", "-rA", "-p", "no:cacheprovider", *test_timeout,
                                    "tests/test_cuda.py", f"--junitxml={os.path.join(check.out, 'test_cuda.xml')}"],
                  parse_tests))
    # (no dry_run part: each bench reports gpt2_pretrain/dry_run.py's estimate for its own config)
    parts.append(("prepare", [], [python, "data/prepare.py", "--source", source, "--out", check.tokens, "--val_tokens",
                                  str(s["val_tokens"]), "--workers", str(s["workers"])], parse_prepare))
    run = check.train_args(
        batch, f"--total_batch_size={s['run_total_batch_size']}", f"--data_dir={check.tokens}",
        f"--out_dir={check.run_dir}", f"--learning_rate={s['learning_rate']}", f"--min_lr={s['learning_rate'] / 10:g}",
        f"--warmup_steps={s['warmup_steps']}", f"--eval_interval={s['max_steps']}", f"--eval_iters={s['eval_iters']}",
        f"--checkpoint_interval={s['max_steps'] // 2}", "--hellaswag=True", f"--hellaswag_path={check.hellaswag_path}",
        f"--sample_tokens={s['sample_tokens']}", "--sample_prompt=ROMEO:")
    parts.append(("run", ["prepare"], [python, "train.py", *run, f"--max_steps={s['max_steps']}"], parse_run))
    parts.append(("resume", ["run"], [python, "train.py", *run, f"--max_steps={s['resume_steps']}", "--resume=auto"],
                  parse_resume))
    # the same steps from the same weights under ddp (fp32 weights, bf16 autocast) and fsdp (bf16 weights
    # gathered, fp32 reduction), uncompiled: what the mixed-precision difference does to the loss
    for parallel, needs in (("ddp", ["prepare"]), ("fsdp", ["precision_ddp"])):
        precision = check.train_args(
            f"--batch_size={s['precision_batch_size']}", f"--total_batch_size={s['precision_total_batch_size']}",
            f"--data_dir={check.tokens}", f"--out_dir={os.path.join(check.work, f'precision_{parallel}')}",
            f"--learning_rate={s['learning_rate']}", f"--min_lr={s['learning_rate'] / 10:g}",
            f"--warmup_steps={s['warmup_steps']}", f"--max_steps={PRECISION_STEPS}", "--eval_iters=0",
            f"--checkpoint_interval={PRECISION_STEPS}", "--keep_last=1", "--sample_tokens=0", "--compile=False",
            f"--parallel={parallel}")
        parts.append((f"precision_{parallel}", needs, [python, "train.py", *precision],
                      lambda output, check, parallel=parallel: parse_precision(output, check, parallel)))
    # one bench process a setting, one after another in one shell, each printing its JSON lines as it goes
    settings = [[python, "scripts/bench.py", *(model or s["model"]), f"--device={s['device']}", "--compile=False",
                 "--wandb_mode=disabled", "--batch_size=auto", f"--total_batch_size={s['ac_total_batch_size']}",
                 "--sample_tokens=0", *s["bench_extra"], f"--activation_checkpointing={mode}", "--bench_compile=off",
                 f"--bench_steps={s['bench_steps']}", "--bench_warmup=1", "--bench_json"]
                for model in s["ac_models"] for mode in s["ac_modes"]]
    parts.append(("bench_activation_checkpointing", [], ["sh", "-c", "; ".join(map(shlex.join, settings))],
                  parse_bench))
    parts.append(variants[1])
    parts.append(("hellaswag", [], [python, "scripts/bench_hellaswag.py", "--hellaswag_path", check.hellaswag_path,
                                    "--examples", str(s["examples"]), "--rounds", str(s["rounds"]), "--device",
                                    s["device"], *s["hellaswag_model"], "--json"], parse_json))
    parts.append(variants[2])  # last: max-autotune may take longer than all that is left
    assert [part[0] for part in parts if part[0] in TAIL] == list(TAIL) == [part[0] for part in parts[-len(TAIL):]]
    return [(name, BUDGETS[name], *rest) for name, *rest in parts]


def missing_module(name):
    """Why `name` cannot be imported in this Python, or None when it can."""
    try:
        return None if importlib.util.find_spec(name) is not None else f"No module named {name!r}"
    except ImportError as e:  # a finder that refuses it
        return str(e)


def cannot_run(name):
    """Why a part cannot start in this Python (a module it needs is missing), or None."""
    if name == "test_cuda" and missing_module("pytest"):
        return (f"pytest is not installed in this Python ({sys.executable}): pip install pytest, or run "
                f"make gpu-check, whose venv has it")
    return None


def run_part(check, name, budget, command, parse, timeout, log):
    """Run one part's command with a timeout; return its record (status, seconds, results or the reason)."""
    record = {"name": name, "budget_seconds": budget, "timeout_seconds": round(timeout, 1),
              "command": " ".join(command)}
    part_log = os.path.join(check.work, f"{name}.log")
    started = time.time()
    with open(part_log, "w") as output_file:
        process = subprocess.Popen(command, cwd=ROOT, stdout=output_file, stderr=subprocess.STDOUT, text=True,
                                   env=dict(os.environ, **check.env), start_new_session=True)
        try:
            record["returncode"] = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            record["returncode"] = None
        finally:
            if process.poll() is None:  # timed out or interrupted: stop it and whatever it started
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    record["seconds"] = round(time.time() - started, 1)
    with open(part_log, errors="replace") as f:
        output = f.read()
    log.write(f"===== {name} ({record['seconds']} s, return code {record['returncode']}): {record['command']}\n"
              f"{output[-200_000:]}\n")
    log.flush()
    record["output_tail"] = output[-3000:]
    if record["returncode"] is None:
        record.update(status="timed out", detail=f"stopped after {timeout:.0f} s (budget {budget_text(budget)})")
        try:  # what it measured before it was stopped: a bench's steps so far, the tests that ran
            record["results"] = parse(output, check)
        except (OSError, ValueError, KeyError, ElementTree.ParseError):
            pass
        running = record.get("results", {}).get("running_when_stopped")
        if running:
            record["detail"] += f"; running {running}"
        return record
    try:
        record["results"] = parse(output, check)
    except (OSError, ValueError, KeyError, ElementTree.ParseError) as e:
        record.update(status="failed", detail=f"return code {record['returncode']}; {type(e).__name__}: {e}")
        return record
    if name == "test_cuda" and record["results"]["skipped"] == len(record["results"]["tests"]):
        record.update(status="skipped", detail=f"all {len(record['results']['tests'])} tests skipped (no CUDA)")
    elif record["returncode"] != 0 or record["results"].get("failed") or record["results"].get("error"):
        failed = [test["name"] for test in record["results"].get("tests", []) if test["outcome"] in ("failed", "error")]
        record.update(status="failed", detail=f"return code {record['returncode']}"
                      + (f"; failed: {', '.join(failed)}" if failed else ""))
    else:
        record.update(status="passed", detail="")
    return record


def budget_text(budget):
    return "the rest" if budget is None else f"{budget} s"


def timeout_for(name, budget, remaining, later):
    """Seconds a part may run: its budget, or more when the parts after it (`later`: their budgets, TAIL's not
    counted) leave time; a TAIL part only what is left, at most its budget."""
    if name in TAIL:
        return remaining if budget is None else min(remaining, budget)
    return min(remaining, max(budget, remaining - later))


def selected(parts, wanted):
    """The parts named in `wanted` (all when empty), the parts they need and the environment, in running order."""
    if not wanted:
        return parts
    names, needs = set(wanted) | {"environment"}, {name: prerequisites for name, _, prerequisites, *_ in parts}
    while True:
        more = names | {need for name in names for need in needs.get(name, [])}
        if more == names:
            break
        names = more
    return [part for part in parts if part[0] in names]


def commit_of(given):
    if given:
        return given
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "") if head.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def gib(value):
    return "" if value is None else f"{value:.2f} GiB"


def seconds_text(value):
    return "" if value is None else f"{value:.1f}"


def size_text(n_bytes):
    """A size in GiB, or MiB below one GiB; n/a for a figure this device does not have (CUDA's on a CPU)."""
    if n_bytes is None:
        return "n/a"
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def on_off(run):
    return "on" if run["compile"] else "off"


def part_label(name, run):
    """The part's name; for the activation-checkpointing part, the model and the setting of each of its runs."""
    if name != "bench_activation_checkpointing":
        return name
    return f"{name}: {run['n_layer']} x {run['n_embd']} {run['parallel']}, {run['activation_checkpointing']}"


def bench_markdown(parts):
    """The benchmarks' section: speed, compilation, memory, Muon's host read, runs stopped part-way."""
    runs = [(name, run) for name, part in parts.items() if name.startswith("bench_")
            for run in part.get("results", {}).get("runs", [])]
    done = [(name, run) for name, run in runs if run["complete"]]
    if not runs:
        return []
    lines = ["", "## scripts/bench.py", ""]
    if done:
        best_name, best = max(done, key=lambda item: item[1]["mfu"] or 0)
        if best["mfu"] is not None:
            lines += [f"Best MFU {format_mfu(best['mfu'])} ({best_name}, compile {on_off(best)}): "
                      f"the 45% goal {'reached' if best['mfu'] >= 0.45 else 'not reached'}.", ""]
        lines += ["| part | compile | loss | inductor | batch x T | step | tokens/s | MFU | first step (compile) | "
                  "graphs, breaks | FX cache hits, misses |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in done:
            tuning = ", ".join(option for option, on in r["inductor_options"].items() if on) or "default"
            compile_seconds = f" ({r['compile_seconds']:.1f} s)" if r["compile_seconds"] is not None else ""
            lines.append(f"| {part_label(name, r)} | {on_off(r)} | {r['loss']} | {tuning} | {r['batch_size']} x {r['block_size']} | "
                         f"{r['step_ms']:.0f} ms | {r['tokens_per_sec']:,.0f} | {format_mfu(r['mfu'])} | "
                         f"{r['first_step_seconds']:.1f} s{compile_seconds} | {r['graphs']}, {r['graph_breaks']} | "
                         f"{r['fx_graph_cache_hits']}, {r['fx_graph_cache_misses']} |")
        lines += ["", "| part | compile | first step: peak allocated, reserved | steady: peak allocated, reserved | "
                  "allocator retries | `--dry_run` estimate | process peak |", "|---|---|---|---|---|---|---|"]
        for name, r in done:
            retries = "n/a" if r["alloc_retries"] is None else r["alloc_retries"]
            lines.append(f"| {part_label(name, r)} | {on_off(r)} | {size_text(r['first_step_peak_allocated'])}, "
                         f"{size_text(r['first_step_peak_reserved'])} | {size_text(r['steady_peak_allocated'])}, "
                         f"{size_text(r['steady_peak_reserved'])} | {retries} | {size_text(r['dry_run_estimate_bytes'])} | "
                         f"{size_text(r['memory_bytes'])} ({r['memory_kind']}) |")
        if all(r["steady_peak_allocated"] is None for _, r in done):
            lines += ["", "Not a CUDA device: the CUDA-only figures (allocated and reserved peaks, allocator retries, "
                      "the memory snapshot) are absent."]
        for name, r in done:
            if r["step_ms_without_host_read"] is not None:
                cost = r["step_ms"] - r["step_ms_without_host_read"]
                lines.append(f"- {name}, compile {on_off(r)}: Muon's host read of the finite flag: "
                             f"step {r['step_ms']:.1f} ms with it, {r['step_ms_without_host_read']:.1f} ms without "
                             f"({cost:+.1f} ms, MFU {format_mfu(r['mfu_without_host_read'])} without)")
            if r["memory_snapshot"]:
                lines.append(f"- {name}: a memory snapshot of one step in `{os.path.basename(r['memory_snapshot'])}` "
                             f"(open it at https://pytorch.org/memory_viz)")
            for reason, count in r["graph_break_reasons"].items():
                lines.append(f"- {name}, graph break x{count}: {reason}")
    for name, run in runs:
        if not run["complete"]:
            steps = ", ".join(f"{step['phase']} {step['seconds']:.2f} s" for step in run["steps"]) or "none"
            lines.append(f"- {name}, compile {on_off(run)}, stopped part-way: setup "
                         f"{run['setup_seconds']:.1f} s, steps done: {steps}")
    return lines


def markdown(report):
    env = report["environment"]
    lines = ["# GPU check" + (" (--tiny, CPU)" if report["tiny"] else ""), "",
             f"{report['started']} | commit {report['commit']} | {env.get('device')} | driver {env.get('driver')} | "
             f"torch {env.get('torch')} | CUDA {env.get('cuda')} | cuDNN {env.get('cudnn')} | Python "
             f"{env.get('python')} | {env.get('cpu')} x {env.get('cpu_count')} | host {env.get('hostname')}", "",
             f"**{'all parts passed' if report['ok'] else 'FAILED: ' + ', '.join(report['failed'])}** in "
             f"{report['wall_seconds']:.0f} s (limit {report['total_seconds']} s). Command: `{report['command']}`", "",
             "| part | status | seconds (budget) | detail |", "|---|---|---|---|"]
    parts = {part["name"]: part for part in report["parts"]}
    for part in report["parts"]:
        lines.append(f"| {part['name']} | {part['status']} | {part.get('seconds', '')} "
                     f"({budget_text(part['budget_seconds'])}) | "
                     f"{part.get('detail', '')} |")
    if "results" in parts.get("test_cuda", {}):
        t = parts["test_cuda"]["results"]
        timeout = f"{t['per_test_timeout']} s a test" if t["per_test_timeout"] else "none (no pytest-timeout)"
        lines += ["", "## tests/test_cuda.py", "", f"From the {t['source']}; timeout {timeout}"
                  + (f"; stopped while running **{t['running_when_stopped']}**" if t["running_when_stopped"] else ""),
                  "", "| test | outcome | seconds |", "|---|---|---|"]
        lines += [f"| {test['name']} | {test['outcome']} | {seconds_text(test['seconds'])} |" for test in t["tests"]]
    lines += bench_markdown(parts)
    if "results" in parts.get("run", {}):
        r = parts["run"]["results"]
        tokens = "" if r["tokens_per_sec"] is None else f", {r['tokens_per_sec']:,.0f} tokens/s"
        lines += ["", "## Real run and resume", "", f"- run: {r['steps']} steps, train loss {r['first_loss']:.3f} -> "
                  f"{r['last_loss']:.3f}, val loss {', '.join(f'{v:.3f}' for v in r['val_loss'])}, HellaSwag acc_norm "
                  f"{', '.join(f'{v:.3f}' for v in r['hellaswag_acc_norm'])}{tokens} (MFU {format_mfu(r['mfu'])}), "
                  f"checkpoint {gib(r['checkpoint_gib'])}"]
    if "results" in parts.get("resume", {}):
        r = parts["resume"]["results"]
        lines.append(f"- resume: from step {r['resumed_at']}, loss there {r['loss_at_resume']:.3f}, {r['steps']} more "
                     f"steps to loss {r['last_loss']:.3f}")
    if "results" in parts.get("precision_fsdp", {}):
        r = parts["precision_fsdp"]["results"]
        lines += ["", "## ddp against fsdp (mixed precision)", "", f"{PRECISION_STEPS} steps of each from the same "
                  f"weights and batches: largest loss gap {r['max_loss_gap']:.4f}, fsdp - ddp at the last step "
                  f"{r['last_loss_gap']:+.4f}", "", "| step | ddp loss | fsdp loss |", "|---|---|---|"]
        lines += [f"| {step} | {a:.4f} | {b:.4f} |" for step, (a, b) in enumerate(zip(r["ddp_losses"], r["losses"]))
                  if step % 5 == 0 or step == PRECISION_STEPS - 1]
    if "results" in parts.get("hellaswag", {}):
        h = parts["hellaswag"]["results"]
        lines += ["", "## HellaSwag throughput", "", f"{h['examples']} examples on {h['device']}: batched "
                  f"{h['batched_examples_per_sec']:,.1f} examples/s, one example a forward "
                  f"{h['per_example_examples_per_sec']:,.1f} examples/s, same scores: {h['same_scores']}"]
    for part in report["parts"]:
        if part["status"] in ("failed", "timed out"):
            lines += ["", f"## {part['name']}: {part['status']}", "", f"    {part['command']}", "", "```",
                      part.get("output_tail", "").rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for the report (created)")
    parser.add_argument("--tiny", action="store_true", help="every part on CPU with a tiny model (CUDA tests skip)")
    parser.add_argument("--parts", default="", help="comma-separated part names to run (default: all)")
    parser.add_argument("--commit", default="", help="commit to name in the report (default: git's HEAD)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (tokens, run, logs)")
    parser.add_argument("--environment", action="store_true", help="print the machine as one JSON line and exit")
    args = parser.parse_args(argv)
    if args.environment:
        print(json.dumps(environment()))
        return 0
    if not args.out:
        print("error: --out DIR is required: the folder to write the report into.", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    check = Check(os.path.abspath(args.out), args.tiny, tempfile.mkdtemp(prefix="gpu_check_"))
    write_hellaswag(check.hellaswag_path, check.size["examples"])
    parts = plan(check)
    known = {part[0] for part in parts}
    wanted = [name for name in args.parts.split(",") if name]
    if set(wanted) - known:
        shutil.rmtree(check.work, ignore_errors=True)
        print(f"error: unknown part(s) {', '.join(sorted(set(wanted) - known))}; the parts are "
              f"{', '.join(part[0] for part in parts)}.", file=sys.stderr)
        return 2
    parts = selected(parts, wanted)
    if args.tiny:
        parts = [(name, TINY_BUDGET, *rest) for name, _, *rest in parts]
    total = sum(part[1] for part in parts) if args.tiny else TOTAL_SECONDS
    for stale in ("test_cuda.xml", "memory_snapshot.pickle"):  # an earlier check's, in the same folder
        if os.path.isfile(os.path.join(check.out, stale)):
            os.remove(os.path.join(check.out, stale))
    started, deadline = datetime.datetime.now(datetime.timezone.utc), time.time() + total
    print(f"gpu_check: {len(parts)} parts, {total} s at most, report in {check.out}", flush=True)
    with open(os.path.join(check.out, "gpu_check.log"), "w") as log:
        for index, (name, budget, needs, command, parse) in enumerate(parts):
            later = sum(part[1] for part in parts[index + 1:] if part[0] not in TAIL)
            timeout = timeout_for(name, budget, deadline - time.time(), later)
            missing = [need for need in needs if check.parts.get(need, {}).get("status") not in ("passed", None)]
            blocked = cannot_run(name)
            if blocked:
                record = {"name": name, "budget_seconds": budget, "status": "failed", "detail": blocked,
                          "command": " ".join(command)}
            elif missing or timeout <= 1:
                reason = f"needs {', '.join(missing)}, which did not pass" if missing else "no time left"
                record = {"name": name, "budget_seconds": budget, "status": "skipped", "detail": reason,
                          "command": " ".join(command)}
            else:
                record = run_part(check, name, budget, command, parse, timeout, log)
            check.parts[name] = record
            print(f"gpu_check: {name:24s} {record['status']:9s} {record.get('seconds', 0):6.1f} s "
                  f"(budget {budget_text(budget)}) {record['detail']}", flush=True)
    failed = [name for name, part in check.parts.items() if part["status"] in ("failed", "timed out")]
    report = {"started": started.strftime("%Y-%m-%d %H:%M UTC"), "commit": commit_of(args.commit), "tiny": args.tiny,
              "command": " ".join(["python", "scripts/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]),
              "total_seconds": total, "wall_seconds": round(time.time() - started.timestamp(), 1),
              "ok": not failed, "failed": failed, "tail": list(TAIL), "compile_cache": check.cache,
              "environment": check.parts.get("environment", {}).get("results", {}), "parts": list(check.parts.values())}
    with open(os.path.join(check.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(check.out, "gpu_check.md"), "w") as f:
        f.write(markdown(report))
    if args.keep:
        print(f"gpu_check: kept {check.work}")
    else:
        shutil.rmtree(check.work, ignore_errors=True)
    print(f"gpu_check: {'all parts passed' if not failed else 'FAILED: ' + ', '.join(failed)}; "
          f"{os.path.join(check.out, 'gpu_check.md')}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
