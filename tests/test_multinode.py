"""Two "nodes" on one machine with nothing shared on disk: each its own working folder, copy of the data and
out_dir. Killed after a checkpoint and restarted, the job resumes from rank 0's checkpoint (sent to the
other node by torch.distributed, not read from its disk) and matches an uninterrupted run exactly. The same
nodes under --parallel=fsdp, whose ranks all write into out_dir, are refused at start.
"""

import os
import shutil
import signal
import socket
import sys
import time

import pytest
import torch

from tests.conftest import (DELAY, RESUME_ARGS, ROOT, curve, finish, make_token_shards, start, tiny_args, wait_for,
                             workers)

pytestmark = pytest.mark.slow  # every test here starts torchrun or several processes


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_command(node_rank, port, extra=()):
    """torchrun for one of two nodes; --local_addr orders the nodes (c10d gives rank 0 to the lower address),
    is_host says which one serves the rendezvous store."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
            f"--node_rank={node_rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
            "--rdzv_id=two_nodes", f"--local_addr=127.0.0.{node_rank + 1}", f"--rdzv_conf=is_host={node_rank == 0}",
            os.path.join(ROOT, "train.py"), *tiny_args("data", "out", *RESUME_ARGS, *extra)]


def start_nodes(nodes, env=None, extra=()):
    """nodes[0] runs rank 0."""
    port = free_port()
    return [start(node_command(rank, port, extra), env=dict(env or {}), cwd=node) for rank, node in enumerate(nodes)]


def test_two_nodes_without_a_shared_filesystem_resume_exactly(tmp_path):
    reference = str(tmp_path / "reference")
    make_token_shards(str(tmp_path / "tokens"))
    code, output = finish(start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "train.py", *tiny_args(str(tmp_path / "tokens"), reference, *RESUME_ARGS)]))
    assert code == 0, output

    nodes = [str(tmp_path / f"node{rank}") for rank in (0, 1)]
    for node in nodes:
        make_token_shards(os.path.join(node, "data"))  # each node its own copy, as on separate machines
    runs = start_nodes(nodes, env=DELAY)
    wait_for(lambda: os.path.exists(os.path.join(nodes[0], "out", "ckpt_000003.pt")), runs[0])
    for run in runs:  # node failure: SIGKILL to both workers and both torchruns
        for pid in [*workers(run.pid).values(), run.pid]:
            os.kill(pid, signal.SIGKILL)
    for run in runs:
        assert finish(run)[0] == -signal.SIGKILL
    node1_out = os.path.join(nodes[1], "out")
    assert not os.path.isdir(node1_out) or not any(name.endswith(".pt") for name in os.listdir(node1_out))

    outputs = [finish(run) for run in start_nodes(nodes)]
    assert all(code == 0 for code, _ in outputs), outputs
    assert "ckpt_000003.pt at step 3" in outputs[0][1]
    assert curve(os.path.join(nodes[0], "out")) == curve(reference)
    final, expected = (torch.load(os.path.join(d, "ckpt_000008.pt"), weights_only=True)
                       for d in (os.path.join(nodes[0], "out"), reference))
    for name, tensor in expected["model"].items():
        assert torch.equal(final["model"][name], tensor), name

    # restarted with the other node as rank 0: its out_dir has no checkpoint, so resuming afresh would be
    # silent; the run refuses and says where the newest checkpoint is
    outputs = [finish(run) for run in start_nodes(nodes[::-1])]
    assert all(code != 0 for code, _ in outputs), outputs
    assert "rank 1 finds out/ckpt_000008.pt, newer than any checkpoint in rank 0's out_dir" in outputs[0][1]


def test_fsdp_nodes_without_a_shared_out_dir_are_refused_at_start(tmp_path):
    """Each node's relative out_dir is its own folder, as on machines without a shared filesystem: the file
    rank 0 writes into its out_dir is missing on the other node, so every rank exits with one error line."""
    nodes = [str(tmp_path / f"node{rank}") for rank in (0, 1)]
    for node in nodes:
        make_token_shards(os.path.join(node, "data"))
    started = time.time()
    outputs = [finish(run, timeout=120) for run in start_nodes(nodes, extra=["--parallel=fsdp"])]
    took = time.time() - started
    assert all(code != 0 for code, _ in outputs), outputs
    both = outputs[0][1] + outputs[1][1]
    assert both.count("error: ") == 1 and 'train.py", line' not in both, outputs  # torchrun adds its own
    assert ("error: --parallel=fsdp writes every rank's checkpoint shards into --out_dir=out, but rank 1 cannot see "
            "rank 0's out (a file rank 0 wrote there is missing): put out_dir on a filesystem every node sees (NFS, "
            "Lustre, ...), or use --parallel=ddp") in outputs[0][1]
    assert "parameters:" not in both  # refused before the model is built
    # the refused run removes the out_dir it created, the check's file with it
    assert not os.path.exists(os.path.join(nodes[0], "out"))
    assert not os.path.exists(os.path.join(nodes[1], "out"))
    print(f"refused in {took:.1f}s")  # well inside the 300 s a rank would wait for a lost peer


def test_a_sharded_resume_path_only_rank_0_sees_is_one_error_on_every_rank(tmp_path):
    """--resume=PATH to a .dcp folder outside out_dir, relative to each node's working folder: node 0 has it,
    node 1 not. Every rank reads its own shards, so every rank stops with one error line, not a hang."""
    source = str(tmp_path / "source")
    make_token_shards(str(tmp_path / "tokens"))
    code, output = finish(start([sys.executable, "train.py", *tiny_args(str(tmp_path / "tokens"), source,
                                                                        "--max_steps=2", "--parallel=fsdp")]))
    assert code == 0, output
    nodes = [str(tmp_path / f"node{rank}") for rank in (0, 1)]
    for node in nodes:
        make_token_shards(os.path.join(node, "data"))
    shutil.copytree(os.path.join(source, "ckpt_000002.dcp"), os.path.join(nodes[0], "saved", "ckpt_000002.dcp"))
    shared_out = str(tmp_path / "shared_out")  # absolute: both nodes see it, as fsdp needs
    started = time.time()
    outputs = [finish(run, timeout=120) for run in start_nodes(nodes, extra=[
        "--parallel=fsdp", f"--out_dir={shared_out}", "--resume=saved/ckpt_000002.dcp"])]
    took = time.time() - started
    assert all(code != 0 for code, _ in outputs), outputs
    both = outputs[0][1] + outputs[1][1]
    assert both.count("error: ") == 1 and 'train.py", line' not in both, outputs
    assert ("error: --resume=saved/ckpt_000002.dcp: rank 1 cannot read this sharded checkpoint" in outputs[0][1])
    assert took < 90, f"{took:.0f} s: the ranks waited for each other"  # a hang would last the 300 s timeout
