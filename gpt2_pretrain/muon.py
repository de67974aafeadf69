"""Muon under FSDP (ShardedMuon): the momentum is elementwise, so each rank keeps it for its own rows. The
Newton-Schulz orthogonalization is not: it needs the whole matrix. Each matrix has an owning rank (by its
Newton-Schulz cost, largest first to the least-loaded rank: assign_owners); the others send it their
rows, the owner orthogonalizes the whole matrix once, and sends each rank its rows of the update back.
Rows travel in bf16: torch's Newton-Schulz casts its input to bf16 before anything else and returns bf16,
so the bytes are half and the result is torch.optim.Muon's update bit for bit. Under ddp (or one process)
the run uses torch.optim.Muon itself.
"""

import torch
import torch.distributed as dist
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

from gpt2_pretrain.parallel import is_dtensor

# the dtype torch's Newton-Schulz casts its input to before anything else (torch 2.13, and the earlier form
# of _zeropower_via_newtonschulz that also takes use_addmm), so ShardedMuon moves rows in it: the same
# update for half of float32's bytes
NEWTON_SCHULZ_DTYPE = torch.bfloat16


def row_counts(rows, world_size):
    """Rows of a dim-0 shard on each rank, as FSDP cuts them (torch.chunk; trailing ranks may get none)."""
    per_rank = -(-rows // world_size)
    return [max(0, min(per_rank, rows - rank * per_rank)) for rank in range(world_size)]


class ShardedMuon(torch.optim.Muon):
    """torch.optim.Muon for FSDP's dim-0 sharded DTensor matrices (plain tensors pass through unchanged)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = []  # (group, param, momentum update): elementwise, so each rank computes its own rows
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buf = state["momentum_buffer"]
                buf.lerp_(param.grad, 1 - group["momentum"])
                update = param.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                todo.append((group, param, update))
        updates = orthogonalize([(update, group) for group, _, update in todo])
        for (group, param, _), update in zip(todo, updates):
            lr = group["lr"]
            param.mul_(1 - lr * group["weight_decay"])
            local = param.to_local() if is_dtensor(param) else param
            local.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], param.shape))
        return loss


def newton_schulz(matrix, group):
    """torch's Newton-Schulz, called as torch.optim.Muon calls it (some torch versions take use_addmm too)."""
    use_addmm = (group["use_addmm"],) if "use_addmm" in group else ()
    return _zeropower_via_newtonschulz(matrix, group["ns_coefficients"], group["ns_steps"], group["eps"], *use_addmm)


def newton_schulz_cost(shape):
    """Multiply-adds of one Newton-Schulz iteration on a (rows, cols) matrix: with m the shorter side and n the
    longer, X @ X.T and its product with X take m*m*n each, the Gram matrix squared m**3."""
    short, long = sorted(shape)
    return 2 * short * short * long + short**3


def assign_owners(shapes, world_size):
    """The owning rank of each matrix: largest Newton-Schulz cost first, each to the least-loaded rank (the
    lowest on a tie). Depends on the shapes alone, so every rank computes the same owners."""
    loads, owners = [0] * world_size, [0] * len(shapes)
    for index in sorted(range(len(shapes)), key=lambda i: -newton_schulz_cost(shapes[i])):  # stable: ties in order
        owner = loads.index(min(loads))
        owners[index] = owner
        loads[owner] += newton_schulz_cost(shapes[index])
    return owners


def rank_loads(shapes, owners, world_size):
    """The Newton-Schulz cost each rank does under `owners`."""
    loads = [0] * world_size
    for shape, owner in zip(shapes, owners):
        loads[owner] += newton_schulz_cost(shape)
    return loads


def orthogonalize(items):
    """Newton-Schulz of each (update, hyperparameters) matrix, whole; returns this rank's rows of each.

    Sharded matrices get owners by cost (assign_owners). All rows travel to the owners first
    (asynchronously), then every rank orthogonalizes the matrices it owns while the others do theirs, and
    scatters the rows back.
    """
    results, sharded = [None] * len(items), []  # sharded: (index, process group of its mesh)
    for index, (update, group) in enumerate(items):
        mesh_group = update.device_mesh.get_group() if is_dtensor(update) else None
        if mesh_group is None or dist.get_world_size(mesh_group) == 1:
            results[index] = newton_schulz(update.to_local() if is_dtensor(update) else update, group)
        else:
            sharded.append((index, mesh_group))
    world_sizes = {dist.get_world_size(mesh_group) for _, mesh_group in sharded}
    assert len(world_sizes) <= 1, f"ShardedMuon wants every matrix sharded over as many ranks, not {world_sizes}"
    owners = assign_owners([tuple(items[index][0].shape) for index, _ in sharded], max(world_sizes, default=1))
    transfers = []
    for (index, mesh_group), owner in zip(sharded, owners):
        update, world_size, rank = items[index][0], dist.get_world_size(mesh_group), dist.get_rank(mesh_group)
        counts = row_counts(update.shape[0], world_size)
        padded = torch.zeros(max(counts), update.shape[1], dtype=NEWTON_SCHULZ_DTYPE, device=update.device)
        local = update.to_local()
        padded[: local.size(0)] = local  # gather and scatter want equal sizes
        pieces = [torch.empty_like(padded) for _ in range(world_size)] if rank == owner else None
        handle = dist.gather(padded, pieces, dst=dist.get_global_rank(mesh_group, owner), group=mesh_group,
                             async_op=True)
        transfers.append((index, mesh_group, owner, rank == owner, counts, padded, pieces, handle))
    for *_, handle in transfers:
        handle.wait()
    scatters = []
    for index, mesh_group, owner, owned, counts, padded, pieces, _ in transfers:
        if owned:
            whole = torch.cat([piece[:count] for piece, count in zip(pieces, counts)])
            result = newton_schulz(whole, items[index][1]).to(padded.dtype)  # torch returns bf16
            pieces = [torch.cat([rows, rows.new_zeros(padded.size(0) - rows.size(0), padded.size(1))])
                      for rows in result.split(counts)]
        scatters.append(dist.scatter(padded, pieces if owned else None, src=dist.get_global_rank(mesh_group, owner),
                                     group=mesh_group, async_op=True))
        results[index] = padded[: counts[dist.get_rank(mesh_group)]]
    for handle in scatters:
        handle.wait()
    return results
