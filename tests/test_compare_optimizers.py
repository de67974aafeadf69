"""scripts/compare_optimizers.py: the sweep picks the lr of lowest val loss, the fraction comes from the tuned runs."""

import importlib.util
import json
import math
import os

import numpy as np
import pytest

from tests.conftest import ROOT, make_token_shards, read_metrics, run_python

spec = importlib.util.spec_from_file_location("compare_optimizers", os.path.join(ROOT, "scripts", "compare_optimizers.py"))
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def first_crossing(curve, target):
    """Reference for steps_to_reach: walk the evaluations, interpolate inside the first segment that gets there."""
    for i, (step, loss) in enumerate(curve):
        if loss <= target:
            if i == 0:
                return step
            previous_step, previous_loss = curve[i - 1]
            return previous_step + (step - previous_step) * (previous_loss - target) / (previous_loss - loss)
    return None


def test_pick_best_takes_the_lowest_finite_loss():
    assert compare.pick_best({1e-3: 3.1, 2e-3: 2.7, 4e-3: 2.9, 8e-3: math.nan, 1.6e-2: math.inf}) == 2e-3
    assert compare.pick_best({0.01: 5.0, 0.02: 4.0, 0.04: 3.5}) == 0.04  # an edge wins when it is lowest
    with pytest.raises(compare.CompareError):
        compare.pick_best({0.01: math.nan, 0.02: math.inf})


def test_recipes_hold_out_the_last_documents_as_byte_level_val(tmp_path):
    from scripts.compare_recipes import byte_shards

    texts = {f"{name}.txt": name.encode() * 3 for name in ("a", "b", "c", "d", "e")}
    for name, data in texts.items():
        (tmp_path / name).write_bytes(data)
    out = byte_shards(str(tmp_path), str(tmp_path / "bytes"), val_documents=2)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    splits = {s["split"]: np.load(os.path.join(out, s["name"])) for s in manifest["shards"]}
    assert bytes(splits["val"].astype(np.uint8)) == b"ddd" + b"eee" and splits["val"].dtype == np.uint16
    assert bytes(splits["train"].astype(np.uint8)) == b"aaabbbccc"


def test_fractions_on_hand_made_curves():
    adamw = {1: [[0, 10.0], [10, 7.0], [20, 5.0]], 2: [[0, 10.0], [10, 6.0], [20, 4.0]]}
    muon = {1: [[0, 10.0], [10, 5.0], [20, 3.0]], 2: [[0, 10.0], [10, 5.0], [20, 4.5]]}
    # seed 1: muon is at 5.0 (adamw's final) at step 10 -> 10/20; seed 2: never reaches 4.0
    assert compare.step_fractions(muon, adamw) == {1: 0.5, 2: None}
    assert compare.steps_to_reach([[0, 10.0], [10, 6.0], [20, 4.0]], 5.0) == 15.0
    assert compare.steps_to_reach([[0, 10.0], [10, 6.0]], 10.0) == 0
    assert compare.spread([0.25, 0.75]) == {"mean": 0.5, "std": math.sqrt(0.125), "min": 0.25, "max": 0.75, "n": 2}
    assert compare.spread([0.5, None]) is None


@pytest.mark.slow
def test_sweep_then_tuned_runs(tmp_path):
    data_dir = make_token_shards(str(tmp_path / "tokens"))
    out = tmp_path / "compare"
    seeds = [1, 2]
    result = run_python(["scripts/compare_optimizers.py", f"--out={out}", "--adamw_lrs", "1e-3", "1e-2",
                         "--muon_lrs", "0.005", "0.05", "--seeds", *map(str, seeds), "--steps=6", "--n_layer=1",
                         "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--total_batch_size=128",
                         "--eval_interval=2", "--eval_iters=2", "--jobs=2", f"--data_dir={data_dir}",
                         "--vocab_size=64", "--device=cpu"])
    assert result.returncode == 0, result.stdout + result.stderr
    with open(out / "optimizer_comparison.json") as f:
        report = json.load(f)
    assert (out / "optimizer_comparison.png").stat().st_size > 0

    for opt, main_flag in (("adamw", "--learning_rate"), ("muon", "--matrix_lr")):
        sweep = report["sweep"][opt]
        for lr, entry in sweep.items():
            # the recorded curve is what train.py logged for that run
            logged = [[r["step"], r["val_loss"]] for r in read_metrics(out / f"{opt}_lr{float(lr):g}_seed1")
                      if "val_loss" in r]
            assert entry["curve"] == logged and entry["final_val_loss"] == logged[-1][1]
            assert f"{main_flag}={float(lr):g}" in entry["flags"]
        assert report["best_lr"][opt] == float(min(sweep, key=lambda lr: sweep[lr]["final_val_loss"]))
        for seed in seeds:
            run = report["tuned"][opt][str(seed)]
            assert f"{main_flag}={report['best_lr'][opt]:g}" in run["flags"] and f"--seed={seed}" in run["flags"]
            logged = [[r["step"], r["val_loss"]] for r in read_metrics(
                out / f"{opt}_lr{report['best_lr'][opt]:g}_seed{seed}") if "val_loss" in r]
            assert run["curve"] == logged
        finals = [report["tuned"][opt][str(seed)]["final_val_loss"] for seed in seeds]
        # numpy's mean against a plain sum: the same float64 numbers, rel 1e-12 allows only the summing order
        assert report["final_val_loss"][opt]["mean"] == pytest.approx(sum(finals) / len(finals), rel=1e-12)

    # the fraction, recomputed from the tuned runs' curves: muon's steps to each seed's adamw final, over 6
    fractions = []
    for seed in seeds:
        adamw, muon = (report["tuned"][opt][str(seed)]["curve"] for opt in ("adamw", "muon"))
        reach = first_crossing(muon, adamw[-1][1])
        fractions.append(None if reach is None else reach / 6)
        reported = report["fraction"]["per_seed"][str(seed)]
        # the same interpolation on the same float64 losses: rel 1e-12 allows only a different operation order
        assert reported is None if reach is None else reported == pytest.approx(fractions[-1], rel=1e-12)
    if None not in fractions:
        assert report["fraction"]["summary"]["mean"] == pytest.approx(sum(fractions) / len(fractions), rel=1e-12)


def test_a_best_lr_at_the_end_of_its_sweep_is_flagged():
    assert compare.sweep_edge(1e-3, [1e-3, 3e-3, 9e-3]) == "smallest"
    assert compare.sweep_edge(9e-3, [3e-3, 1e-3, 9e-3]) == "largest"
    assert compare.sweep_edge(3e-3, [1e-3, 3e-3, 9e-3]) is None
    assert compare.sweep_edge(1e-3, [1e-3]) is None  # one lr is no sweep
    assert "extend the sweep" in compare.report({
        "sweep": {}, "final_val_loss": {}, "best_lr": {}, "best_at_edge": {"adamw": "smallest"},
        "seeds": [], "fraction": {"per_seed": {}, "summary": None}})
