"""Several FSDP checks in one process start (for tests/test_parallel.py): torchrun's start-up is the slow part.

    torchrun --nproc_per_node=2 tests/fsdp_worker.py TOKEN_DIR OUT_ROOT   # fsdp runs and checks
    python tests/fsdp_worker.py TOKEN_DIR OUT_ROOT                        # the single-process references

Trains the tiny model with adamw and with muon into OUT_ROOT/{adamw,muon}; under torchrun also checks
ShardedMuon against torch.optim.Muon on whole matrices, and writes how many optimizer-state elements
each rank holds to OUT_ROOT/state_rank{R}.json, and round-trips both setups' states through a sharded
checkpoint.
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
from distributed import setup_distributed, teardown_distributed  # noqa: E402
from checkpoint_files import load_optimizer_state  # noqa: E402
from parallel import ShardedMuon, optimizer_state_elements, shard_model  # noqa: E402
from sharded_checkpoint import load_sharded, save_sharded  # noqa: E402
from tests.conftest import tiny_args  # noqa: E402

MUON_SHAPES = [(8, 5), (5, 8), (7, 3), (1, 4), (16, 16)]  # odd row counts: uneven shards, one rank empty


def check_sharded_muon(info):
    """Three steps of ShardedMuon on sharded matrices equal torch.optim.Muon's on the whole ones."""
    torch.manual_seed(0)
    full = [torch.randn(shape) for shape in MUON_SHAPES]
    grads = [[torch.randn(shape) for shape in MUON_SHAPES] for _ in range(3)]
    reference = [torch.nn.Parameter(w.clone()) for w in full]
    holder = torch.nn.ParameterList([torch.nn.Parameter(w.clone()) for w in full])
    fully_shard(holder)
    hyper = dict(lr=0.02, weight_decay=0.01, momentum=0.9, nesterov=True, adjust_lr_fn="original")
    sharded, plain = ShardedMuon(list(holder), **hyper), torch.optim.Muon(reference, **hyper)
    for step_grads in grads:
        for p, q, g in zip(holder, reference, step_grads):
            p.grad = distribute_tensor(g, p.device_mesh, p.placements)
            q.grad = g.clone()
        sharded.step()
        plain.step()
    for shape, p, q in zip(MUON_SHAPES, holder, reference):
        torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-6, atol=1e-7, msg=f"shape {shape}")


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


def main():
    token_dir, out_root = sys.argv[1:3]
    distributed = "WORLD_SIZE" in os.environ
    info = setup_distributed("cpu")
    try:
        for optimizer_name in ("adamw", "muon"):
            config = load_config(tiny_args(token_dir, os.path.join(out_root, optimizer_name), "--max_steps=4",
                                           "--eval_interval=4", f"--optimizer={optimizer_name}",
                                           f"--parallel={'fsdp' if distributed else 'ddp'}"))
            train.train(config, info)
        if distributed:
            check_sharded_muon(info)
            count_state(config, info, out_root)
    finally:
        teardown_distributed()


if __name__ == "__main__":
    main()
