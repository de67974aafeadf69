"""FSDP (--parallel=fsdp) against single-process references: real torchrun, gloo, CPU."""

import json
import math
import os
import re

import pytest

from configure_optimizers import muon_param_groups
from gpt2_pretrain.dry_run import meta_model
from gpt2_pretrain.muon import assign_owners, newton_schulz_cost, rank_loads
from model import GPTConfig
from tests.conftest import FULL_VOCAB, read_metrics, run_python, tiny_args, torchrun, write_examples


@pytest.mark.slow
def test_fsdp_matches_one_process_and_shards_the_optimizer_state(token_dir, tmp_path):
    """2-process fsdp and 1-process ddp on the same global batch: the same losses and gradient norms step
    by step, for adamw and muon. The gradient norm is what catches gradients summed over ranks instead of
    averaged (pytorch issue 162338): Adam and Muon updates barely notice a 2x gradient, the norm doubles.
    Step 1's loss is NaN in both: the non-finite guard skips its update in both alike. Under torchrun, ddp and
    fsdp with activation checkpointing log what they log without it."""
    reference, sharded = str(tmp_path / "reference"), str(tmp_path / "fsdp")
    nan_step = {"GPT2_DEBUG_NAN_STEPS": "1"}
    result = run_python(["tests/fsdp_worker.py", token_dir, reference], env=nan_step)
    assert result.returncode == 0, result.stderr[-3000:]
    result = torchrun(2, "tests/fsdp_worker.py", [token_dir, sharded], env=nan_step)
    assert result.returncode == 0, result.stderr[-3000:]
    for optimizer, tolerance in (("adamw", 1e-4), ("muon", 2e-3)):
        one, two = read_metrics(os.path.join(reference, optimizer)), read_metrics(os.path.join(sharded, optimizer))
        assert [m["step"] for m in one] == [m["step"] for m in two]
        assert [m["loss"] for m in one + two if m["step"] == 1 and "loss" in m] == [None, None]  # NaN logs as null
        for a, b in zip(one, two):
            for key in ("loss", "grad_norm", "val_loss"):
                if key in a and a["step"] != 1:
                    # float32 reduction order alone, on any CPU: muon's Newton-Schulz runs in float32 in these
                    # runs (tests/float32_newton_schulz.py says why). adamw: about 1e-5 relative. muon: the
                    # hybrid's AdamW (eps 1e-10) turns gradients that are float32 noise (the key bias's true
                    # gradient is zero) into whole steps, 7e-4 relative by step 3 on the dev box; a gradient
                    # summed instead of averaged over ranks doubles the norm
                    assert math.isclose(a[key], b[key], rel_tol=tolerance), (optimizer, key, a, b)

    # each rank holds about half of the optimizer state: adamw two moments per element, muon's hidden
    # matrices one momentum and the rest two adamw moments
    ranks = [json.load(open(os.path.join(sharded, f"state_rank{rank}.json"))) for rank in (0, 1)]
    for optimizer in ("adamw", "muon"):
        params = ranks[0][optimizer]["params"]
        full_state = 2 * params - ranks[0][optimizer]["muon_params"]
        assert sum(r[optimizer]["local_params"] for r in ranks) == params
        assert sum(r[optimizer]["state"] for r in ranks) == full_state
        for r in ranks:
            assert abs(r[optimizer]["state"] - full_state / 2) <= 0.02 * full_state, (optimizer, r)

    # activation checkpointing under torchrun changes nothing, bit for bit: each rank recomputes the same
    # float32 ops on the same inputs, and the collectives (ddp's all-reduce, fsdp's all-gathers and
    # reduce-scatters) see the same gradients in the same order
    for parallel, mode in (("ddp", "selective"), ("fsdp", "full")):
        runs = [read_metrics(os.path.join(sharded, f"ac_{parallel}_{m}")) for m in ("none", mode)]
        logged = [[(m["step"], m.get("loss"), m.get("grad_norm"), m.get("val_loss")) for m in run] for run in runs]
        assert len([record for record in logged[0] if record[1] is not None]) == 10
        assert logged[1] == logged[0], parallel


@pytest.mark.slow
def test_compiled_fsdp_trains_like_eager_fsdp_with_one_graph_for_every_block(token_dir, tmp_path):
    """2-process fsdp, compiled (each block before fully_shard) against eager: the same losses, gradient norms,
    val losses and HellaSwag scores, with and without activation checkpointing. The blocks share one graph for
    training and one for the val loss (no_grad): 2 graphs, the second a recompile, no graph break; the root
    (GPT.forward) is never traced, and sampling and HellaSwag, run eagerly, compile nothing. Compiled whole
    after fully_shard instead, GPT.forward is given up by dynamo."""
    args = tiny_args(token_dir, str(tmp_path / "unused"), FULL_VOCAB, "--parallel=fsdp", "--n_layer=3",
                     "--sample_tokens=4", "--hellaswag", f"--hellaswag_path={write_examples(tmp_path / 'hs.jsonl')}")
    # aot_eager: dynamo's graphs (the wrapping order, the graph counts, fsdp's hooks outside them) and autograd's
    # joint graphs run as traced, without inductor's C++ build of the same kernels on both ranks (half a minute of
    # the suite's CPU); inductor under fsdp is the GPU check's bench_*_fsdp parts, which compile with it
    result = torchrun(2, "tests/compile_worker.py", [str(tmp_path), *args],
                      env={"TEST_COMPILED_BACKEND": "aot_eager"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sample at step 4" in result.stdout
    logged = {run: read_metrics(str(tmp_path / run)) for run in ("eager", "compiled", "compiled_ac")}
    for run in ("compiled", "compiled_ac"):
        assert [m["step"] for m in logged[run]] == [m["step"] for m in logged["eager"]]
        for a, b in zip(logged["eager"], logged[run]):
            for key in ("loss", "grad_norm", "val_loss", "hellaswag_acc_norm"):
                if key in a:
                    # aot_eager runs the aten ops eager runs, in the same order: bit for bit
                    assert a[key] == b[key], (run, key, a, b)
        for rank in (0, 1):
            with open(tmp_path / run / f"compile_counts_rank{rank}.json") as f:
                counts = json.load(f)
            # on a CPU fused_loss.py compiles nothing of its own: the blocks' forward is all there is
            block = "activation_checkpointing.py:checkpointed_forward" if run == "compiled_ac" else "model.py:forward"
            assert counts == {"graphs": 2, "graph_breaks": 0, "recompiles": 1, "compiled": {block: 2},
                              "skipped": {}}, run
    # why: compiled whole after fully_shard (the order before), GPT.forward meets fsdp's dynamo-disabled hooks at
    # its first block and is given up, run eagerly; only the functions it calls are compiled, each on its own
    for rank in (0, 1):
        with open(tmp_path / f"old_order_rank{rank}.json") as f:
            counts = json.load(f)
        assert counts["skipped"] == {"model.py:forward": 1} and counts["compiled"]["model.py:forward"] == 1, counts


@pytest.mark.slow  # starts a Python process that imports torch: about 4 s each on the 2-core box
def test_dry_run_shows_ddp_and_fsdp_memory_for_the_xl_config(token_dir):
    """GPT-2 XL's config on 8 GPU processes: fsdp holds 1/8 of the weights, gradients and optimizer state.
    --device=cuda: a dry run estimates for the device named, and on a machine without one speaks of its CPU."""
    result = run_python(["train.py", "configs/gpt2_xl_fsdp.py", f"--data_dir={token_dir}", "--dry_run",
                         "--device=cuda"],
                        env={"WORLD_SIZE": "8"})
    assert result.returncode == 0, result.stderr
    assert "parameters: 1,557,686,400" in result.stdout  # GPT-2 XL with the vocab padded to 50304
    lines = {parallel: next(line for line in result.stdout.splitlines()
                            if f"GPU memory per process ({parallel}" in line) for parallel in ("ddp", "fsdp")}
    assert "fsdp, this run, 8 processes" in lines["fsdp"]
    for part in ("weights", "gradients", "optimizer state"):
        ddp, fsdp = (float(re.search(rf"{part} ([\d.]+) GiB", lines[p]).group(1)) for p in ("ddp", "fsdp"))
        assert math.isclose(fsdp, ddp / 8, rel_tol=0.02), (part, ddp, fsdp)  # printed to 0.01 GiB: 0.2% of 2.9


def test_sharded_muon_owners_share_the_newton_schulz_work():
    """Owners by cost, largest first to the least-loaded rank: at 8 ranks the busiest rank does 2% more than
    the mean for GPT-2 124M and exactly the mean for XL, where round robin gave c_fc's owners 9/7 of it.
    Prints the table in docs/benchmarks.md (pytest -s)."""
    assert assign_owners([(4, 4), (8, 8), (2, 2), (8, 8)], 2) == [0, 0, 1, 1]  # ties: the lower rank, in order
    unit = 768**3  # 124M's costs are whole multiples: c_attn 7, attn.c_proj 3, c_fc and mlp.c_proj 9
    assert [newton_schulz_cost(s) // unit for s in [(2304, 768), (768, 768), (3072, 768), (768, 3072)]] == [7, 3, 9, 9]
    print("\n| model | matrices | round robin: largest / mean per rank | by cost: largest / mean per rank |")
    for name, n_layer, n_head, n_embd, after in (("GPT-2 124M", 12, 12, 768, 43 / 42), ("GPT-2 XL", 48, 25, 1600, 1.0)):
        model = meta_model(GPTConfig(block_size=1024, vocab_size=50304, n_layer=n_layer, n_head=n_head, n_embd=n_embd))
        shapes = [tuple(p.shape) for _, p in muon_param_groups(model)["matrix"]]
        round_robin = rank_loads(shapes, [i % 8 for i in range(len(shapes))], 8)
        by_cost = rank_loads(shapes, assign_owners(shapes, 8), 8)
        mean = sum(by_cost) / 8
        assert sum(round_robin) == sum(by_cost)
        assert max(round_robin) / mean == 9 / 7  # exact: integer costs
        assert max(by_cost) / mean == after
        # multiply-adds of Newton-Schulz (5 iterations) a Muon step, in units of 10^9
        print(f"| {name} | {len(shapes)} | {5 * max(round_robin) / 1e9:.1f} / {5 * mean / 1e9:.1f} "
              f"({max(round_robin) / mean:.3f}) | {5 * max(by_cost) / 1e9:.1f} / {5 * mean / 1e9:.1f} "
              f"({max(by_cost) / mean:.3f}) |")
