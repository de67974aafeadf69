"""Several FSDP checks in one process start (for tests/test_parallel.py): torchrun's start-up is the slow part.

    torchrun --nproc_per_node=2 tests/fsdp_worker.py TOKEN_DIR OUT_ROOT   # fsdp runs and checks
    python tests/fsdp_worker.py TOKEN_DIR OUT_ROOT                        # the single-process references

Trains the tiny model with adamw and with muon into OUT_ROOT/{adamw,muon}; under torchrun also checks
ShardedMuon against torch.optim.Muon on whole matrices, and writes how many optimizer-state elements
each rank holds to OUT_ROOT/state_rank{R}.json.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import distribute_tensor  # noqa: E402

import train  # noqa: E402
from config import load_config  # noqa: E402
from distributed import setup_distributed, teardown_distributed  # noqa: E402
from parallel import ShardedMuon, optimizer_state_elements, shard_model  # noqa: E402
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


def count_state(config, info, out_root):
    """One step of each optimizer setup on a sharded model; this rank's state and parameter elements."""
    counts = {}
    for optimizer_name in ("adamw", "muon"):
        config.optimizer = optimizer_name
        torch.manual_seed(0)
        model = shard_model(train.GPT(train.model_config(config)), info)
        optimizers = train.make_optimizers(config, model, "cpu", log=lambda *a: None)
        x = torch.randint(0, 64, (2, config.block_size))
        model(x, x)[1].backward()
        for optimizer in optimizers:
            optimizer.step()
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
