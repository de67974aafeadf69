"""The README's "Your own text" commands run as written, parsed from README.md so the two cannot drift apart."""

import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT


def own_text_commands():
    """The `python ...` lines of the README's "Your own text" section, as argv lists."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index("\n## Your own text"):]
    section = section[:section.index("\n## ", 1)]
    return [shlex.split(line.split("  #")[0]) for line in section.splitlines() if line.startswith("    python ")]


def as_run_here(argv):
    """`python` is this interpreter and the repository's own .py files come from this checkout; every other
    path (the text folder, the shards, out/) stays relative to the folder the commands run in."""
    repo_file = [os.path.join(ROOT, arg) if arg.endswith(".py") and os.path.isfile(os.path.join(ROOT, arg)) else arg
                 for arg in argv[1:]]
    assert argv[0] == "python"
    return [sys.executable, *repo_file]


def write_texts(folder, documents=40, words=600, seed=0):
    """A folder of .txt files, one document each: sentences of common English words (about 30k tokens)."""
    vocabulary = ("the a of and to in is was he she it that his her with for as on at by from they we you "
                  "this had not are but were one all there when what which their said would could time day "
                  "night king house river light water old new long little great good first last").split()
    rng = np.random.default_rng(seed)
    os.makedirs(folder)
    for d in range(documents):
        sentences = [" ".join(rng.choice(vocabulary, rng.integers(5, 15))).capitalize() + "."
                     for _ in range(words // 10)]
        with open(os.path.join(folder, f"doc_{d:03d}.txt"), "w") as f:
            f.write(" ".join(sentences) + "\n")


@pytest.mark.slow
def test_own_text_section_runs_as_written_offline(tmp_path):
    commands = own_text_commands()
    assert [argv[1] for argv in commands] == ["data/prepare.py", "train.py", "scripts/sample.py", "scripts/plot.py"]
    assert "--source" in commands[0] and "configs/own_text_cpu.py" in commands[1]
    write_texts(tmp_path / commands[0][commands[0].index("--source") + 1])
    # offline: the hub and W&B are told so, and any other connection goes to a closed port; one thread per
    # process, since these small steps only wait on each other when the two cores are shared
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HTTP_PROXY="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9", OMP_NUM_THREADS="1")
    env.pop("WANDB_MODE", None)  # the config itself turns W&B off
    # the training command as written, cut to 2 short steps (flags win wherever they stand)
    short = ["--max_steps=2", "--eval_interval=2", "--eval_iters=1", "--batch_size=4", "--total_batch_size=512"]
    outputs = []
    for argv in commands:
        argv = as_run_here(argv) + (short if argv[1] == "train.py" else [])
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        outputs.append(result.stdout)
    assert "run finished at step 2/2" in outputs[1] and "  out_dir: out/my_texts" in outputs[1]
    assert len(outputs[2].strip()) > 0  # a sample of text
    with open(tmp_path / "out" / "my_texts" / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
