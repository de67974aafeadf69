"""Activation checkpointing per transformer block: keep a block's input, recompute its insides in the backward.

    --activation_checkpointing=none       every block keeps what its backward needs (the default)
    --activation_checkpointing=full       every block keeps only its input (B, T, C): one more forward per step
    --activation_checkpointing=selective  every --ac_every-th block (the 1st, N+1-th, ...) is checkpointed

Each chosen block's forward is replaced on the instance by torch.utils.checkpoint around the original one,
so no module is swapped in: state_dict keys stay as they are, and a checkpoint written with one setting
loads under any other. Applied before torch.compile and fully_shard (parallel.py says why).
"""

import types

from torch.utils.checkpoint import checkpoint


def checkpointed_blocks(n_layer, mode, every):
    """Indices of the blocks whose activations are recomputed: none, all, or every `every`-th from the first."""
    if mode == "none":
        return []
    if mode == "full":
        return list(range(n_layer))
    return list(range(0, n_layer, every))


def checkpointed_forward(block, x):
    """The block's forward under torch.utils.checkpoint; bound to the block, it is a method as Block.forward is, so
    torch.compile (compiling.py) traces it as one function shared by all blocks."""
    # use_reentrant=False: works with torch.compile, fsdp's hooks and inputs that need no grad
    return checkpoint(type(block).forward, block, x, use_reentrant=False)


def apply_activation_checkpointing(blocks, mode, every):
    """Checkpoint the chosen blocks of `blocks` (a ModuleList) in place; returns the indices checkpointed."""
    chosen = checkpointed_blocks(len(blocks), mode, every)
    for index in chosen:
        block = blocks[index]
        block.forward = types.MethodType(checkpointed_forward, block)  # an instance attribute: keys unchanged
    return chosen
