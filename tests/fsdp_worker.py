"""Several FSDP checks in one process start (for tests/test_parallel.py): torchrun's start-up is the slow part.

    torchrun --nproc_per_node=2 tests/fsdp_worker.py TOKEN_DIR OUT_ROOT   # fsdp runs and checks
    python tests/fsdp_worker.py TOKEN_DIR OUT_ROOT                        # the single-process references

Trains the tiny model with adamw and with muon (Newton-Schulz in float32) into OUT_ROOT/{adamw,muon}; under
torchrun also checks
ShardedMuon (fsdp) and torch.optim.Muon (ddp's replicas) against torch.optim.Muon on whole matrices, a
skipped non-finite step included, checks that fsdp's gradient accumulation reduce-scatters every
micro-step and sums to the gradient of the whole batch, writes how many optimizer-state elements each
rank holds to OUT_ROOT/state_rank{R}.json, round-trips both setups' states through a sharded
checkpoint, and trains ddp and fsdp with and without activation checkpointing into OUT_ROOT/ac_*.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor, distribute_tensor  # noqa: E402

import train  # noqa: E402
from config import load_config  # noqa: E402
from gpt2_pretrain.checkpoint.files import load_optimizer_state  # noqa: E402
from gpt2_pretrain.checkpoint.sharded import load_sharded, save_sharded  # noqa: E402
from gpt2_pretrain.distributed import setup_distributed, teardown_distributed  # noqa: E402
from gpt2_pretrain.guards import NonFiniteGuard, apply_update  # noqa: E402
from gpt2_pretrain.muon import ShardedMuon  # noqa: E402
from gpt2_pretrain.parallel import shard_model  # noqa: E402
from tests.conftest import tiny_args  # noqa: E402
from tests.float32_newton_schulz import float32_newton_schulz  # noqa: E402

MUON_SHAPES = [(8, 5), (5, 8), (7, 3), (1, 4), (16, 16)]  # odd row counts: uneven shards, one rank empty



def optimizer_state_elements(optimizer):
    """Elements of optimizer state this rank holds (its shards only under FSDP); step counters left out."""
    total = 0
    for state in optimizer.state.values():
        for name, value in state.items():
            if torch.is_tensor(value) and name != "step":
                total += (value.to_local() if isinstance(value, DTensor) else value).numel()
    return total

def whole(value):
    return value.full_tensor() if isinstance(value, DTensor) else value.detach()


def check_muon_against_torch(sharded):
    """Three Muon steps, the second with NaN gradients and skipped through guards.apply_update, against
    torch.optim.Muon on whole matrices that is given only the two finite steps: parameters and momentum equal
    bit for bit after every step, so the skipped step changed nothing. sharded: ShardedMuon on fully_shard's
    DTensors (fsdp); else torch.optim.Muon on plain tensors (one process, or each of ddp's ranks)."""
    torch.manual_seed(0)
    full = [torch.randn(shape) for shape in MUON_SHAPES]
    grads = [[torch.randn(shape) for shape in MUON_SHAPES] for _ in range(3)]
    grads[1] = [torch.full(shape, float("nan")) for shape in MUON_SHAPES]
    reference = [torch.nn.Parameter(w.clone()) for w in full]
    tested = torch.nn.ParameterList([torch.nn.Parameter(w.clone()) for w in full])
    if sharded:
        fully_shard(tested)
    hyper = dict(lr=0.02, weight_decay=0.01, momentum=0.9, nesterov=True, adjust_lr_fn="original")
    optimizer = (ShardedMuon if sharded else torch.optim.Muon)(list(tested), **hyper)
    plain = torch.optim.Muon(reference, **hyper)
    for step, step_grads in enumerate(grads):
        finite = step != 1
        for p, q, g in zip(tested, reference, step_grads):
            p.grad = distribute_tensor(g, p.device_mesh, p.placements) if sharded else g.clone()
            q.grad = g.clone()
        apply_update([optimizer], torch.tensor(finite))
        if finite:
            plain.step()
        # exact: the momentum and the weight update are elementwise (the same on rows as on the whole), and the
        # owner runs torch's Newton-Schulz on the same bf16 matrix that torch.optim.Muon gives it
        for shape, p, q in zip(MUON_SHAPES, tested, reference):
            assert torch.equal(whole(p), q.detach()), (sharded, step, shape)
            assert torch.equal(whole(optimizer.state[p]["momentum_buffer"]), plain.state[q]["momentum_buffer"]), \
                (sharded, step, shape)


def check_accumulation(config, info):
    """fsdp with 2 micro-steps: each micro-step's backward leaves this rank's gradient shard (a DTensor, reduce-
    scattered), not a whole gradient kept until the last one; the accumulated shards equal the gradient of the
    whole global batch on one unsharded model."""
    config.grad_clip = 0.0  # compare the raw gradients
    torch.manual_seed(0)
    reference = train.GPT(train.model_config(config))
    torch.manual_seed(0)
    model = shard_model(train.GPT(train.model_config(config)), info)  # the same initial weights, sharded
    micro_steps, rows = 2, config.batch_size
    x = torch.randint(0, 64, (micro_steps * info.world_size * rows, config.block_size + 1),
                      generator=torch.Generator().manual_seed(1))
    batches = [(x[i:i + rows, :-1], x[i:i + rows, 1:]) for i in range(0, len(x), rows)]
    calls = []

    def next_batch():
        if calls:  # micro-step 0's backward is done: every gradient is already a reduce-scattered shard
            assert all(isinstance(p.grad, DTensor) for p in model.parameters()), "gradients held unsharded"
        calls.append(1)
        return batches[(len(calls) - 1) * info.world_size + info.rank]

    train.train_step(model, [], next_batch, micro_steps, 0, config, info, NonFiniteGuard(1))
    reference(x[:, :-1], x[:, 1:])[1].backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        # float32 sums in another order (by rank and micro-step); a dropped or doubled micro-step would be off
        # by a quarter or more, a few ulps of reordering by far less than 1e-4 of the largest entry
        scale = q.grad.abs().max().item()
        torch.testing.assert_close(whole(p.grad), q.grad, rtol=1e-4, atol=1e-4 * scale, msg=name)


def local(value):
    return value.to_local() if isinstance(value, DTensor) else torch.as_tensor(value)


def sharded_setup(config, info, steps):
    """The tiny model sharded, its optimizers, and `steps` updates on a fixed batch."""
    torch.manual_seed(0)
    model = shard_model(train.GPT(train.model_config(config)), info)
    optimizers = train.make_optimizers(config, model, "cpu", log=lambda *a: None)
    x = torch.randint(0, 64, (2, config.block_size))
    for _ in range(steps):
        model(x, x)[1].backward()
        for optimizer in optimizers:
            optimizer.step()
    return model, optimizers


def count_state(config, info, out_root):
    """One step of each optimizer setup on a sharded model; this rank's state and parameter elements."""
    counts = {}
    for optimizer_name in ("adamw", "muon"):
        config.optimizer = optimizer_name
        model, optimizers = sharded_setup(config, info, steps=1)
        # a sharded checkpoint round trip: a fresh model and optimizers get the same shards back
        path = os.path.join(out_root, f"{optimizer_name}.dcp")
        save_sharded({"step": 1}, path, model, optimizers)
        fresh, fresh_optimizers = sharded_setup(config, info, steps=0)
        load_sharded(path, fresh, fresh_optimizers, load_optimizer_state)
        for a, b in zip(model.parameters(), fresh.parameters()):
            assert torch.equal(local(a), local(b))
        for optimizer, loaded in zip(optimizers, fresh_optimizers):
            for group, loaded_group in zip(optimizer.param_groups, loaded.param_groups, strict=True):
                for p, q in zip(group["params"], loaded_group["params"], strict=True):
                    state, loaded_state = optimizer.state[p], loaded.state[q]
                    assert state.keys() == loaded_state.keys() and state, (optimizer_name, state.keys())
                    for key in state:
                        assert torch.equal(local(state[key]), local(loaded_state[key])), (optimizer_name, key)
        counts[optimizer_name] = {
            "state": sum(optimizer_state_elements(o) for o in optimizers),
            "local_params": sum(p.to_local().numel() for p in model.parameters()),
            "params": sum(p.numel() for p in model.parameters()),
            "muon_params": sum(p.numel() for p in optimizers[0].param_groups[0]["params"])
            if optimizer_name == "muon" else 0,
        }
    with open(os.path.join(out_root, f"state_rank{info.rank}.json"), "w") as f:
        json.dump(counts, f)


def train_with_activation_checkpointing(token_dir, out_root, info):
    """10 steps of 2 micro-steps (ddp's no_sync on the first), 3 blocks, ddp and fsdp each without activation
    checkpointing and with it (ddp selective, fsdp full), into OUT_ROOT/ac_{parallel}_{mode}."""
    os.environ.pop("GPT2_DEBUG_NAN_STEPS", None)  # every step a real one here
    for parallel, mode in (("ddp", "none"), ("ddp", "selective"), ("fsdp", "none"), ("fsdp", "full")):
        config = load_config(tiny_args(token_dir, os.path.join(out_root, f"ac_{parallel}_{mode}"), "--n_layer=3",
                                       "--max_steps=10", "--eval_interval=5", "--total_batch_size=512",
                                       f"--parallel={parallel}", f"--activation_checkpointing={mode}"))
        train.train(config, info)


def main():
    token_dir, out_root = sys.argv[1:3]
    distributed = "WORLD_SIZE" in os.environ
    info = setup_distributed("cpu")
    try:
        for optimizer_name in ("adamw", "muon"):
            config = load_config(tiny_args(token_dir, os.path.join(out_root, optimizer_name), "--max_steps=4",
                                           "--eval_interval=4", f"--optimizer={optimizer_name}",
                                           f"--parallel={'fsdp' if distributed else 'ddp'}"))
            with float32_newton_schulz():  # the comparison with one process: see tests/float32_newton_schulz.py
                train.train(config, info)
        if distributed:
            check_muon_against_torch(sharded=True)
            check_muon_against_torch(sharded=False)
            check_accumulation(config, info)
            count_state(config, info, out_root)
            train_with_activation_checkpointing(token_dir, out_root, info)
    finally:
        teardown_distributed()


if __name__ == "__main__":
    main()
