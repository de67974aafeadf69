"""What the user gives, checked before it is used, and the one way a user's mistake is reported.

A mistake (a bad flag, an absent device, an out_dir that cannot be written or that another run holds,
a disk too full for a checkpoint) ends in one `error: ...` line and exit code 2, never a traceback; a bug
in our own code keeps its traceback. Under torchrun an error every rank sees is printed once (by rank 0),
and an error only some ranks see is printed by each of them as `error: [rank R] ...`.
"""

import contextlib
import datetime
import errno
import fcntl
import os
import re
import secrets
import socket
import sys
import time

import torch
import torch.distributed as dist

from config import ConfigError
from gpt2_pretrain import console
from gpt2_pretrain.elastic import holder_tag, is_earlier_attempt, next_attempt_note

# how long a failing rank waits for rank 0's error before deciding that rank 0 does not share it: ranks
# that hit the same mistake reach it within moments of each other
PEER_ERROR_WAIT_SECONDS = 10
# how long a rank that lost contact waits to hear from the others: those that did not say they lost contact
# too are named as the lost ones (every live rank's next collective fails within moments of a death)
LOST_PEER_WAIT_SECONDS = 2
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# how long a restarted torchrun job waits for its previous attempt to let go of out_dir's lock: torchrun
# SIGKILLs a worker 30 s after its SIGTERM, and the kernel drops the lock when the process is gone
RESTART_LOCK_WAIT_SECONDS = 60


def _job_store():
    """The job's key-value store: torchrun's agent serves it before any process group exists (a client
    connects to MASTER_ADDR:MASTER_PORT); otherwise the process group's, or None."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=datetime.timedelta(seconds=PEER_ERROR_WAIT_SECONDS))
    if dist.is_available() and dist.is_initialized():
        return dist.distributed_c10d._get_default_store()
    return None


def _error_key():
    return f"gpt2_error/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"  # a restarted job starts clean


def claim_job_line(message, rank):
    """From a thread that ends the process (the watchdog): leave this rank's error in the job's store, so the
    other ranks' lost-peer lines are not printed, and return True when this rank is the first to claim the
    job's one line (True too when there is no store to ask)."""
    try:
        store = _job_store()
        store.set(f"{_error_key()}{rank}", message)
        return store.add(f"{_error_key()}job_line", 1) == 1
    except Exception:  # no store to reach (the agent is gone): say it ourselves
        return True


def _line_under_torchrun(message, rank, world_size, consequence):
    """What this rank prints, or None. Each failing rank leaves its message in the job's store: rank 0
    prints its own; another rank prints its own as [rank R] unless rank 0 has the same (waited for, bounded,
    which also keeps it alive until rank 0 has printed); a lost peer, the consequence of another rank's
    error, is not printed again, and one that no rank's error explains is printed once (_lost_peer_line)."""
    key = _error_key()
    try:
        store = _job_store()
        if store is None:
            return message if rank == 0 else None  # every rank checked the same flags and files: rank 0 speaks
        if consequence and any(store.check([f"{key}{r}"]) for r in range(world_size) if r != rank):
            return None
        if consequence:
            return _lost_peer_line(store, key, message, rank, world_size)
        if rank == 0:
            console.write(f"error: {message}\n", sys.stderr)  # before the key: the others exit after it
            with contextlib.suppress(Exception):
                store.set(f"{key}0", message)
            return None
        store.set(f"{key}{rank}", message)
        store.wait([f"{key}0"], datetime.timedelta(seconds=PEER_ERROR_WAIT_SECONDS))
        same = store.get(f"{key}0").decode() == message
    except Exception:  # no answer in time, or no store to reach: say it ourselves
        same = False
    return None if same else f"[rank {rank}] {message}" if rank else message


def _lost_peer_line(store, key, message, rank, world_size):
    """A lost peer, printed once for the whole job and naming the ranks that were lost: each rank that lost
    contact says so in the store; the ranks not heard from within LOST_PEER_WAIT_SECONDS (and that reported
    no error of their own) are the lost ones, and the first rank to claim the line prints it."""
    store.set(f"{key}alive/{rank}", "1")
    others = [r for r in range(world_size) if r != rank]
    deadline = time.time() + LOST_PEER_WAIT_SECONDS
    while True:
        lost = [r for r in others if not store.check([f"{key}alive/{r}"])]
        if not lost or time.time() > deadline:
            break
        time.sleep(0.05)
    if any(store.check([f"{key}{r}"]) for r in others) or store.add(f"{key}lost_line", 1) != 1:
        return None  # another rank's own error says why, or another rank prints this line
    if lost:
        who = f"rank {lost[0]}" if len(lost) == 1 else f"ranks {', '.join(map(str, lost))}"
        message = message.replace("another rank", who, 1)
    return message


def fail(message, consequence=False, level="error"):
    """A user's mistake (or a fault outside our code): one `error:` line, no traceback, exit code 2. A fault
    that torchrun answers with a restart is a `warning:` line instead (level)."""
    message = str(message)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        message = _line_under_torchrun(message, int(os.environ.get("RANK", "0")), world_size, consequence)
    if message is not None:
        console.write(f"{level}: {message}\n", sys.stderr)  # a closed stderr drops it; console.log keeps it
    raise SystemExit(2)


# how a collective fails when another rank is gone or stuck (gloo's transport errors, either backend's timeout)
PEER_LOST = ("gloo/transport", "Connection reset by peer", "Connection closed by peer", "Broken pipe", "timed out",
             "Timed out")


@contextlib.contextmanager
def reported_as_errors(*user_errors, out_dir="out"):
    """Around a run: the user's mistakes, a full disk and a lost peer rank become fail()'s one line."""
    try:
        yield
    except user_errors as e:
        fail(e)
    except KeyboardInterrupt:  # Ctrl-C before the stop handler is in place (start-up), or a second one
        fail("interrupted by Ctrl-C before a checkpoint could be written: the checkpoints already in out_dir are "
             "kept; run the command again to continue from them (--resume=auto).")
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        fail(f"no space left on the disk of {e.filename or out_dir}: free some space, then continue with "
             f"--resume=auto (the checkpoints already written are kept).")
    except RuntimeError as e:  # gloo's lost connections are RuntimeErrors, NCCL's DistErrors
        lost = isinstance(e, getattr(dist, "DistError", ())) or any(s in str(e) for s in PEER_LOST)
        if not (lost and dist.is_available() and dist.is_initialized()):
            raise
        restart = next_attempt_note()  # torchrun --max-restarts: the job goes on by itself
        then = f"{restart}." if restart else "Fix that, then continue with --resume=auto."
        fail(f"lost contact with another rank ({str(e).splitlines()[0][:200]}): it died or hung, and its own "
             f"output (or torchrun's, for a killed process) says why. {then}",
             consequence=True, level="warning" if restart else "error")


def check_device(requested, local_rank=0, torchrun=False):
    """The device string to compute on, or a ConfigError saying why the requested one cannot be used."""
    match = re.fullmatch(r"(auto|cpu|cuda|mps)(?::(\d+))?", requested)
    if not match or (match.group(2) is not None and match.group(1) != "cuda"):
        raise ConfigError(f"--device={requested} is not a device: use auto, cpu, cuda, cuda:N or mps.")
    kind, index = match.group(1), match.group(2)
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if kind == "cuda":
        if index is not None and torchrun:
            raise ConfigError(f"--device={requested} under torchrun would put every rank on GPU {index}: use "
                              f"--device=cuda (each rank takes the GPU of its LOCAL_RANK), and choose the GPUs "
                              f"with CUDA_VISIBLE_DEVICES.")
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"--device={requested} but {why}: use --device=cpu (or auto), or install a CUDA "
                              f"build of torch on a machine with an NVIDIA GPU (check nvidia-smi).")
        count = torch.cuda.device_count()
        if index is not None and int(index) >= count:
            raise ConfigError(f"--device={requested} but this machine has {count} GPU(s), cuda:0 to "
                              f"cuda:{count - 1}: choose one of them.")
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if torchrun else 1
        if local_world_size > count:
            raise ConfigError(f"torchrun started {local_world_size} processes on this node but it has {count} "
                              f"GPU(s): use --nproc_per_node={count}.")
        return f"cuda:{index if index is not None else local_rank}"
    if kind == "mps" and not mps:
        raise ConfigError(f"--device={requested} but MPS is not available (it needs Apple silicon and a torch "
                          f"built with MPS): use --device=cpu or auto.")
    return kind


@contextlib.contextmanager
def hold_out_dir(out_dir, is_master=True):
    """Create out_dir and hold its lock for the run; a second run on it is refused, naming the first.

    flock, not a pid file: the kernel drops the lock when its process ends, however it ends (SIGKILL
    included), so a killed run never leaves out_dir locked.
    """
    if not is_master:
        yield
        return
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd = os.open(os.path.join(out_dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"cannot create or write --out_dir={out_dir}: {e.strerror}. Choose a folder you can "
                          f"write to.") from None
    try:
        _take_lock(fd, out_dir)
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}{holder_tag()}: "
                     f"{' '.join(sys.argv)}".encode())
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _take_lock(fd, out_dir):
    """flock out_dir's lock, or a ConfigError naming its holder. The holder may be an earlier attempt of this
    torchrun job (a restart), which torchrun has stopped and which is on its way out: waited for, bounded."""
    deadline = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process"
        if not is_earlier_attempt(holder):
            raise ConfigError(f"--out_dir={out_dir} is in use by another run ({holder}): wait for it to end, "
                              f"or give this run another --out_dir.")
        deadline = deadline or time.time() + RESTART_LOCK_WAIT_SECONDS
        if time.time() > deadline:
            raise ConfigError(f"--out_dir={out_dir} is still held by the previous attempt of this torchrun job "
                              f"({holder}) {RESTART_LOCK_WAIT_SECONDS} s after the restart: that process does not "
                              f"end (stuck in the kernel or on a device); end it, then start the job again.")
        time.sleep(0.1)


def check_shared_out_dir(out_dir, parallel):
    """Under --parallel=fsdp every rank writes its checkpoint shards into out_dir, so every rank must see
    rank 0's out_dir (one filesystem on every node). Rank 0 writes a file of random name and contents there,
    each other rank reads it, and every rank raises the same ConfigError when any rank does not see it."""
    if parallel != "fsdp" or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    rank, world_size = dist.get_rank(), dist.get_world_size()
    box = [secrets.token_hex(16), None]  # from os.urandom: the run's random states are not drawn from
    path = os.path.join(out_dir, f".shared_check_{box[0]}")  # a new name: no node has it cached as absent
    if rank == 0:
        try:
            with open(path, "w") as f:
                f.write(box[0])
        except OSError as e:
            box[1] = f"cannot write a file into --out_dir={out_dir}: {e.strerror}. Choose a folder you can write to."
    dist.broadcast_object_list(box, src=0)  # after rank 0 has closed the file
    token, problem = box
    path = os.path.join(out_dir, f".shared_check_{token}")
    seen = True
    if rank != 0 and problem is None:
        try:
            with open(path) as f:
                seen = f.read() == token
        except OSError:  # no such file or folder on this node
            seen = False
    seen_by = [None] * world_size
    dist.all_gather_object(seen_by, seen)  # every rank has read it: rank 0 may remove it
    if rank == 0:
        with contextlib.suppress(OSError):
            os.remove(path)
    if problem is not None:
        raise ConfigError(problem)
    blind = [r for r, s in enumerate(seen_by) if not s]
    if blind:
        listed = ", ".join(map(str, blind[:8])) + (", ..." if len(blind) > 8 else "")
        ranks = f"rank {blind[0]}" if len(blind) == 1 else f"ranks {listed} ({len(blind)} of {world_size})"
        raise ConfigError(f"--parallel=fsdp writes every rank's checkpoint shards into --out_dir={out_dir}, but "
                          f"{ranks} cannot see rank 0's {out_dir} (a file rank 0 wrote there is missing): put "
                          f"out_dir on a filesystem every node sees (NFS, Lustre, ...), or use --parallel=ddp, whose "
                          f".pt checkpoints only rank 0 writes and reads.")


def check_ranks_agree(config, shards):
    """Before the first step every rank sends its resolved config (a dict) and its data manifest's shards
    ({name: entry}) to the others; a difference from rank 0 stops every rank with the same ConfigError,
    naming the ranks and the keys or shards, instead of a hang in the first collective that they disagree on."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (config, shards))
    (config0, shards0), differences = gathered[0], []
    for rank, (config_r, shards_r) in enumerate(gathered[1:], 1):
        keys = sorted(k for k in config0.keys() | config_r.keys() if config0.get(k) != config_r.get(k))
        names = sorted(n for n in shards0.keys() | shards_r.keys() if shards0.get(n) != shards_r.get(n))
        if keys:
            differences.append(f"rank {rank} has " + ", ".join(f"{k}={config_r.get(k)!r} (rank 0: {config0.get(k)!r})"
                                                                 for k in keys[:8]))
        if names:
            listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            differences.append(f"rank {rank}'s data_dir differs from rank 0's in shards {listed}")
    if differences:
        shown = "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")
        raise ConfigError(f"the ranks disagree before the first step: {shown}. Start every rank with the same "
                          f"command, config files and flags, and the same data (compare manifest.json).")


def tensor_bytes(obj):
    """Bytes of the tensors in a nested checkpoint: about what it takes on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def failed_save_message(path, checkpoint, error, kept):
    """'no space left for PATH: a checkpoint needs about X MB and Y MB are free ...; the newest kept is ...'."""
    kept = f"the newest checkpoint kept is {kept}"
    if error.errno not in DISK_FULL:
        return f"could not write {path}: {error.strerror or error}; {kept}"
    free = os.statvfs(os.path.dirname(os.path.abspath(path)))
    return (f"no space left for {path}: a checkpoint needs about {tensor_bytes(checkpoint) / 1e6:,.1f} MB and "
            f"{free.f_bavail * free.f_frsize / 1e6:,.1f} MB are free on that disk; {kept}")
