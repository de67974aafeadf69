"""torch.compile for training: what is compiled under each --parallel mode, evaluation kept eager, graph counts.

    --parallel=ddp  --compile   the whole model, checkpointed blocks inside (parallel.py wraps it in DDP after)
    --parallel=fsdp --compile   each block's forward, after activation checkpointing and before fully_shard
                                (torchtitan's order); the root (embeddings, ln_f, the loss) runs eagerly

Why the two orders differ: docs/distributed.md#torchcompile.
"""

import functools
import os
import sys
from collections import Counter
from contextlib import nullcontext

import torch


def compile_blocks(blocks):
    """Compile each block's forward in place (an instance attribute, as activation checkpointing sets: state_dict
    keys unchanged). fsdp's hooks, added later by fully_shard, run around the compiled forward, never inside it, so
    dynamo meets none of them (they are dynamo-disabled: a graph break each) and fullgraph holds. The blocks share
    one graph: dynamo keys it on Block.forward's code and takes the weights as inputs."""
    for block in blocks:
        block.forward = torch.compile(block.forward, fullgraph=True)


def uncompiled():
    """A context in which compiled code runs eagerly. For sampling and HellaSwag through the model with its
    blocks compiled in place (fsdp): their (rows, length) shapes would each compile a graph, and then make
    dynamo mark batch and sequence dynamic in the training graph compiled after them."""
    if "torch._dynamo" not in sys.modules:  # nothing was compiled in this process: spare the import (about 1 s)
        return nullcontext()
    return torch.compiler.set_stance("force_eager")


def eagerly(function):
    """`function` with compiled code run eagerly during its calls (see uncompiled())."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        with uncompiled():
            return function(*args, **kwargs)
    return run


def compile_counts():
    """What dynamo did in this process since it started (or since reset_compile_counts()):
    {"graphs": graphs compiled, recompilations included; "graph_breaks": breaks within traced functions;
     "recompiles": compilations of code that already had a graph (another grad mode, shape, ...);
     "compiled": {"file.py:function": graphs compiled from it};
     "skipped": {"file.py:function": times dynamo gave it up and ran it eagerly (a graph break in a loop, a
                 call it must not trace: what whole-model compile did to GPT.forward under fsdp)}}.
    recompiles, compiled and skipped count the last 64 compilations (dynamo keeps that many records)."""
    if "torch._dynamo" not in sys.modules:
        return {"graphs": 0, "graph_breaks": 0, "recompiles": 0, "compiled": {}, "skipped": {}}
    from torch._dynamo.utils import counters, get_compilation_metrics

    records = [record for record in get_compilation_metrics() if record.co_name]
    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "recompiles": sum(1 for record in records if record.graph_op_count and record.recompile_reason),
            "compiled": _by_function(record for record in records if record.graph_op_count),
            "skipped": _by_function(record for record in records if record.fail_type)}


def _by_function(records):
    return dict(Counter(f"{os.path.basename(record.co_filename)}:{record.co_name}" for record in records))


def reset_compile_counts():
    """Start compile_counts() from zero (the compiled graphs are kept: torch._dynamo.reset() drops those)."""
    if "torch._dynamo" in sys.modules:
        from torch._dynamo.utils import clear_compilation_metrics, counters

        counters.clear()
        clear_compilation_metrics()
