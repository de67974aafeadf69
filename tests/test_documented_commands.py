"""Every documented multi-process command of train.py at its documented world size, and evaluations whose
ranks hold unequal shares: real torchrun, gloo, CPU.

A rank that skips a forward the others run hangs a sharded model (each forward is a collective, the weight
all-gather) until the process-group timeout. The commands come from the files (the `# run:` lines of the
config headers, the README's torchrun lines), so a newly documented one is run too, with the model shrunk
by flags but batch_size, eval_iters, hellaswag and parallel as documented. The commands of one world size
run one after another in one torchrun launch (train.main called again in the same processes, as a sweep
or a notebook does), with a process-group timeout of PG_TIMEOUT seconds: a hang fails the test then, not at
300 s."""

import glob
import json
import math
import os
import shlex

import pytest

from config import config_to_dict, load_config
from tests.conftest import (EXAMPLES, FULL_VOCAB, ROOT, make_token_shards, read_metrics, tiny_args, torchrun_bounded,
                            write_examples)

pytestmark = pytest.mark.slow  # every test here starts torchrun or several processes

PG_TIMEOUT = 120  # a healthy collective waits for the slowest rank: seconds under load, never minutes
MAX_PROCESSES = 8  # the README's 2-node example (16 ranks) runs as one node of 8, its config's world size there
BLOCK_SIZE = 8  # the rows of every batch and evaluation go through the 50304-column head: the cost of a command
STEPS = 2


def documented_lines():
    """(file, line) of each torchrun command: config headers' comment lines, and the README's code lines
    (indented or fenced) with their backslash continuations joined."""
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
        with open(path) as f:
            header = [line for line in f.read().splitlines() if line.startswith("#")]
        found += [(os.path.basename(path), line[line.index("torchrun "):]) for line in header if "torchrun " in line]
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read().replace("\\\n", " ")
    fenced = False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        if (fenced or line.startswith("    ")) and line.strip().startswith("torchrun "):  # code, not prose
            found.append(("README.md", line.strip()))
    return found


def parse_torchrun(line):
    """(processes, script, script arguments) of a torchrun command line (`--key=value` launcher options)."""
    words = shlex.split(line, comments=True)[1:]
    options = {}
    while words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        options[key] = value
    processes = int(options.get("nproc_per_node", 1)) * int(options.get("nnodes", 1))
    return min(processes, MAX_PROCESSES), words[0], words[1:]


def shrink(documented, processes, data_dir, out_dir, hellaswag_path):
    """The documented arguments, then flags for a tiny model and a few steps: batch_size, eval_iters, hellaswag
    and parallel as the config has them; two micro-steps a step; compile off (minutes of inductor on CPU);
    a sample of 2 tokens (under fsdp each token is a forward on every rank, a collective: 2 are enough)."""
    config = load_config(documented)
    micro_step = config.batch_size * BLOCK_SIZE * processes
    return [*documented, "--n_layer=1", "--n_head=2", "--n_embd=16", f"--block_size={BLOCK_SIZE}", "--compile=false",
            "--device=cpu", "--wandb_mode=disabled", f"--max_steps={STEPS}", f"--total_batch_size={2 * micro_step}",
            f"--sample_tokens={min(config.sample_tokens, 2)}", f"--data_dir={data_dir}", f"--out_dir={out_dir}",
            f"--hellaswag_path={hellaswag_path}"]


def documented_runs(data_dir, out_root, hellaswag_path):
    """{processes: [(where, arguments)]}, one run per distinct resolved config; --dry_run commands left out
    (they start no process group; test_parallel runs the XL one at WORLD_SIZE=8)."""
    runs, seen = {}, set()
    for where, line in documented_lines():
        processes, script, documented = parse_torchrun(line)
        if script != "train.py":
            continue  # scripts/eval.py: HellaSwag under 2-process torchrun in test_evaluate
        config = load_config(shrink(documented, processes, data_dir, "", hellaswag_path))
        key = (processes, json.dumps(config_to_dict(config), sort_keys=True))
        if config.dry_run or key in seen:
            continue
        seen.add(key)
        args = shrink(documented, processes, data_dir, os.path.join(out_root, f"run{len(seen)}"), hellaswag_path)
        runs.setdefault(processes, []).append((f"{where}: {line}", args))
    return runs


def launch(processes, commands, tmp_dir, name):
    """The commands in one torchrun launch of `processes` ranks; the result (returncode None: killed)."""
    listing = os.path.join(tmp_dir, f"commands_{name}.json")
    with open(listing, "w") as f:
        json.dump(commands, f)
    result = torchrun_bounded(processes, "tests/commands_worker.py", [listing], timeout=3 * PG_TIMEOUT + 120 *
                              len(commands), env={"TEST_PG_TIMEOUT": str(PG_TIMEOUT)})
    assert result.returncode == 0, f"returncode {result.returncode} (None: killed at the bound)\n" \
                                   f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Run the documented commands, plus a 2-rank fsdp run with uneven evaluation shares:
    {"documented": [(where, arguments)], "uneven": (out_dir, the 1-process reference's arguments)}."""
    tmp = tmp_path_factory.mktemp("commands")
    # enough val windows for eval_iters * batch_size (20 * 64 for 124M) of BLOCK_SIZE, and train windows
    data_dir = make_token_shards(str(tmp / "tokens"), train_tokens=40000, val_tokens=24000)
    hellaswag = tmp / "hellaswag.jsonl"
    write_examples(hellaswag)  # 3: ranks 3-7 of 8 have none
    runs = documented_runs(data_dir, str(tmp), str(hellaswag))
    # fsdp, eval_iters=5 at batch_size 4: 20 val windows in calls of 8, rank 1 has none in the third; HellaSwag
    # on one example: rank 1 has none
    one_example = tmp / "hellaswag_one.jsonl"
    write_examples(one_example, EXAMPLES[:1])
    uneven = ["--eval_iters=5", "--max_steps=2", "--hellaswag", f"--hellaswag_path={one_example}", FULL_VOCAB]
    uneven_out = str(tmp / "uneven")
    runs.setdefault(2, []).append(("uneven", tiny_args(data_dir, uneven_out, "--parallel=fsdp",
                                                       *uneven)))
    for processes, listed in sorted(runs.items()):
        # every command of one world size in one launch: train.main runs again in the same processes, on the
        # same process group (at 8 ranks a 124M ddp run, then the XL fsdp one)
        launch(processes, [args for _, args in listed], str(tmp), str(processes))
    documented = [(where, args) for listed in runs.values() for where, args in listed if where != "uneven"]
    return {"documented": documented, "uneven": (uneven_out, tiny_args(data_dir, str(tmp / "one"), *uneven))}


def test_every_documented_command_evaluates_trains_and_saves(launched):
    documented = launched["documented"]
    wheres = " ".join(where for where, _ in documented)
    # the commands that hung before: the XL config, and an fsdp run (its config file sets parallel = "fsdp")
    assert "gpt2_xl_fsdp.py" in wheres and any(load_config(args).parallel == "fsdp" for _, args in documented)
    for where, args in documented:
        config = load_config(args)
        metrics = read_metrics(config.out_dir)
        assert [m["step"] for m in metrics if "val_loss" in m] == [0, STEPS], where
        assert [m["step"] for m in metrics if "hellaswag_acc" in m] == ([0, STEPS] if config.hellaswag else []), where
        assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m), where
        suffix = ".dcp" if config.parallel == "fsdp" else ".pt"
        assert os.path.exists(os.path.join(config.out_dir, f"ckpt_{STEPS:06d}{suffix}")), where


def test_fsdp_with_uneven_evaluation_shares_matches_one_process(launched):
    """The 2-rank fsdp run (val windows and HellaSwag examples unevenly shared): one process's val loss and
    HellaSwag scores."""
    import train

    sharded, reference_args = launched["uneven"]
    train.main(reference_args)
    reference = load_config(reference_args).out_dir
    evaluations = [[m for m in read_metrics(out) if "val_loss" in m or "hellaswag_acc" in m]
                   for out in (reference, sharded)]
    assert [m["step"] for m in evaluations[1]] == [0, 0, 2, 2]
    for one, two in zip(*evaluations):
        if "val_loss" in one:  # float32 sums in another order (sharded gradients): relative 1e-5 is 100x that noise
            assert math.isclose(one["val_loss"], two["val_loss"], rel_tol=1e-5), (one, two)
        else:
            assert one == two and two["hellaswag_examples"] == 1
