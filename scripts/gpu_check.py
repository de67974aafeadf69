"""Check the GPU path in one call: the GPU tests, GPT-2 124M benchmarks, a short real run with a resume,
ddp against fsdp's mixed precision, HellaSwag speed and the machine, in at most 8 min 40 s, written to one
report (markdown and JSON).

    python scripts/gpu_check.py --out out/gpu_check        # on one GPU (make gpu-check runs this)
    python scripts/gpu_check.py --tiny --out /tmp/check    # every part on CPU with a tiny model
    python scripts/gpu_check.py --out DIR --parts bench_adamw_ddp,run   # some parts (and what they need)

Each part is a subprocess with a time budget in seconds (on an H200, compilation included); time a part
leaves unused goes to the later ones. A part that fails or runs out of time is reported and the check goes
on. Written to DIR: gpu_check.md, gpu_check.json, gpu_check.log (every part's command and output) and
test_cuda.xml (the GPU tests' junit). Exit status 1 if any part failed or ran out of time. It needs
torch, numpy, tiktoken and safetensors only: wandb and datasets are not used.
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
TOTAL_SECONDS = 520  # the whole check on one H200: the budgets below sum to 508, the rest is this script's own
BENCH_RUNS = [("adamw", "ddp", 60), ("muon", "ddp", 35), ("adamw", "fsdp", 60), ("muon", "fsdp", 35)]
# the first compile of a graph (adamw ddp, adamw fsdp) is cold; muon reuses it from inductor's cache
SIZES = {
    "gpu": dict(device="cuda", compile=True, model=["configs/gpt2_124m.py"], bench_total_batch_size=2**19,
                bench_steps=3, bench_warmup=2, run_total_batch_size=65536, learning_rate=6e-4, warmup_steps=5,
                max_steps=20, resume_steps=30, eval_iters=2, sample_tokens=16, loss_drop=1.0, examples=128,
                rounds=3, hellaswag_model=["--n_layer", "12", "--n_head", "12", "--n_embd", "768", "--block_size", "1024"],
                val_tokens=100_000, plays=None, workers=8, bench_extra=[], precision_batch_size=16,
                precision_total_batch_size=16384, precision_max_loss_gap=0.1),
    "tiny": dict(device="cpu", compile=False, model=["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=64"],
                 bench_total_batch_size=256, bench_steps=2, bench_warmup=1, run_total_batch_size=256,
                 learning_rate=3e-3, warmup_steps=2, max_steps=10, resume_steps=12, eval_iters=1, sample_tokens=4,
                 loss_drop=0.3, examples=4, rounds=1,
                 hellaswag_model=["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "64"],
                 val_tokens=5_000, plays=["comedy_of_errors.txt", "cymbeline.txt"], workers=1,
                 bench_extra=["--vocab_size=128"], precision_batch_size=4, precision_total_batch_size=256,
                 precision_max_loss_gap=0.1),
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


def parse_dry_run(output, check):
    totals = dict(re.findall(r"GPU memory per process \((ddp|fsdp)\b.*total ([\d.]+) GiB", output))
    if set(totals) != {"ddp", "fsdp"}:
        raise ValueError("no 'GPU memory per process (ddp|fsdp ...): ... total X GiB' lines in the --dry_run output")
    return {f"{parallel}_estimate_gib": float(total) for parallel, total in totals.items()}


def parse_tests(output, check):
    tree = ElementTree.parse(os.path.join(check.out, "test_cuda.xml"))
    tests = []
    for case in tree.iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            element = case.find(kind)
            if element is not None:
                outcome, message = {"failure": "failed"}.get(kind, kind), (element.get("message") or "")[:500]
        tests.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                      "message": message})
    counts = {outcome: sum(t["outcome"] == outcome for t in tests) for outcome in ("passed", "failed", "error", "skipped")}
    if not tests:
        raise ValueError("no tests in the junit xml")
    return {"tests": tests, **counts}


def parse_bench(output, check):
    result = last_json(output)
    estimate = check.parts.get("dry_run", {}).get("results", {}).get(f"{result['parallel']}_estimate_gib")
    return {key: result[key] for key in ("optimizer", "parallel", "device", "compile", "batch_size", "block_size",
                                         "tokens_per_step", "step_ms", "tokens_per_sec", "mfu", "memory_kind")} | {
        "memory_gib": result["memory_bytes"] / 2**30, "dry_run_estimate_gib": estimate}


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
    """[(name, budget seconds, prerequisite parts, command, parse)] in running order."""
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
    parts = [
        ("environment", 8, [], [python, os.path.abspath(__file__), "--environment"], parse_json),
        ("prepare", 15, [], [python, "data/prepare.py", "--source", source, "--out", check.tokens, "--val_tokens",
                             str(s["val_tokens"]), "--workers", str(s["workers"])], parse_prepare),
        ("dry_run", 10, ["prepare"], [python, "train.py", *check.train_args(*bench_batch, f"--data_dir={check.tokens}",
                                                                          "--dry_run", "--device=cuda")],
         parse_dry_run),  # --device=cuda: the GPU estimates, also in --tiny on a CPU
        ("hellaswag", 25, [], [python, "scripts/bench_hellaswag.py", "--hellaswag_path", check.hellaswag_path,
                               "--examples", str(s["examples"]), "--rounds", str(s["rounds"]), "--device", s["device"],
                               *s["hellaswag_model"], "--json"], parse_json),
        ("test_cuda", 90, [], [python, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "tests/test_cuda.py",
                               f"--junitxml={os.path.join(check.out, 'test_cuda.xml')}"], parse_tests),
    ]
    for optimizer, parallel, budget in BENCH_RUNS:
        parts.append((f"bench_{optimizer}_{parallel}", budget, [], [
            python, "scripts/bench.py", *check.train_args(*bench_batch, f"--optimizer={optimizer}",
                                                          f"--parallel={parallel}"),
            f"--bench_compile={'on' if s['compile'] else 'off'}", f"--bench_steps={s['bench_steps']}",
            f"--bench_warmup={s['bench_warmup']}", "--bench_json"], parse_bench))
    run = check.train_args(
        batch, f"--total_batch_size={s['run_total_batch_size']}", f"--data_dir={check.tokens}",
        f"--out_dir={check.run_dir}", f"--learning_rate={s['learning_rate']}", f"--min_lr={s['learning_rate'] / 10:g}",
        f"--warmup_steps={s['warmup_steps']}", f"--eval_interval={s['max_steps']}", f"--eval_iters={s['eval_iters']}",
        f"--checkpoint_interval={s['max_steps'] // 2}", "--hellaswag=True", f"--hellaswag_path={check.hellaswag_path}",
        f"--sample_tokens={s['sample_tokens']}", "--sample_prompt=ROMEO:")
    parts.append(("run", 85, ["prepare"], [python, "train.py", *run, f"--max_steps={s['max_steps']}"], parse_run))
    parts.append(("resume", 45, ["run"], [python, "train.py", *run, f"--max_steps={s['resume_steps']}",
                                          "--resume=auto"], parse_resume))
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
        parts.append((f"precision_{parallel}", 20, needs, [python, "train.py", *precision],
                      lambda output, check, parallel=parallel: parse_precision(output, check, parallel)))
    return parts


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
                                   env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
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
        record.update(status="timed out", detail=f"stopped after {timeout:.0f} s (budget {budget} s)")
        return record
    try:
        record["results"] = parse(output, check)
    except (OSError, ValueError, KeyError, ElementTree.ParseError) as e:
        record.update(status="failed", detail=f"return code {record['returncode']}; {type(e).__name__}: {e}")
        return record
    if name == "test_cuda" and record["results"]["skipped"] == len(record["results"]["tests"]):
        record.update(status="skipped", detail=f"all {len(record['results']['tests'])} tests skipped (no CUDA)")
    elif record["returncode"] != 0 or record["results"].get("failed") or record["results"].get("error"):
        record.update(status="failed", detail=f"return code {record['returncode']}")
    else:
        record.update(status="passed", detail="")
    return record


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
        lines.append(f"| {part['name']} | {part['status']} | {part.get('seconds', '')} ({part['budget_seconds']}) | "
                     f"{part.get('detail', '')} |")
    if "results" in parts.get("test_cuda", {}):
        lines += ["", "## tests/test_cuda.py", "", "| test | outcome | seconds |", "|---|---|---|"]
        lines += [f"| {t['name']} | {t['outcome']} | {t['seconds']:.1f} |" for t in parts["test_cuda"]["results"]["tests"]]
    bench = [parts[name]["results"] for name in parts if name.startswith("bench_") and "results" in parts[name]]
    if bench:
        lines += ["", "## scripts/bench.py", "", "| optimizer | parallel | batch x T | compile | step | tokens/s | MFU | "
                  "peak memory | `--dry_run` estimate |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {b['optimizer']} | {b['parallel']} | {b['batch_size']} x {b['block_size']} | {b['compile']} | "
                  f"{b['step_ms']:.0f} ms | {b['tokens_per_sec']:,.0f} | {format_mfu(b['mfu'])} | "
                  f"{gib(b['memory_gib'])} ({b['memory_kind']}) | {gib(b['dry_run_estimate_gib'])} |" for b in bench]
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
    started, deadline = datetime.datetime.now(datetime.timezone.utc), time.time() + total
    print(f"gpu_check: {len(parts)} parts, {total} s at most, report in {check.out}", flush=True)
    with open(os.path.join(check.out, "gpu_check.log"), "w") as log:
        for index, (name, budget, needs, command, parse) in enumerate(parts):
            later = sum(part[1] for part in parts[index + 1:])
            timeout = min(deadline - time.time(), max(budget, deadline - time.time() - later))
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
            print(f"gpu_check: {name:18s} {record['status']:9s} {record.get('seconds', 0):6.1f} s "
                  f"(budget {budget} s) {record['detail']}", flush=True)
    failed = [name for name, part in check.parts.items() if part["status"] in ("failed", "timed out")]
    report = {"started": started.strftime("%Y-%m-%d %H:%M UTC"), "commit": commit_of(args.commit), "tiny": args.tiny,
              "command": " ".join(["python", "scripts/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]),
              "total_seconds": total, "wall_seconds": round(time.time() - started.timestamp(), 1),
              "ok": not failed, "failed": failed,
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
