"""Checkpoint files: read one (full .pt or sharded .dcp), list, validate (checksum.py) and compare them, set
newer ones aside for a new timeline, and the random and optimizer states they carry. The run's own saving
and resuming is checkpointer.Checkpointer; files are written with atomic.atomic_save.
"""

import json
import os
import random
import re
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist

from config import ARCHITECTURE_KEYS, ARCHITECTURES, ConfigError, config_to_dict
from gpt2_pretrain.atomic import atomic_write, fsync_path
from gpt2_pretrain.checkpoint.checksum import checksum_problem
from gpt2_pretrain.checkpoint.sharded import SHARDED, is_sharded_checkpoint, load_full_weights, read_meta

SET_ASIDE = "set_aside"  # the folder of out_dir that older timelines and broken files are moved into
CHECKPOINT_NAME = re.compile(r"^(ckpt|best)_(\d+)\.(pt|dcp)$")
MODEL_SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", *ARCHITECTURE_KEYS)
RESUME_MUST_MATCH = (*MODEL_SHAPE, "optimizer")
REQUIRED_KEYS = ("model", "optimizers", "step", "config", "ranks")


def clean_state_dict(model):
    """Weights of the bare model: unwrap DDP (.module) and torch.compile (._orig_mod)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model.state_dict()


def load_checkpoint(path, device="cpu", mmap=False):
    """mmap: tensors read from the file as they are used (a check of the checksum then holds no copy)."""
    if is_sharded_checkpoint(path):
        return read_meta(path)  # the weights stay in the shard files: model_weights() gathers them
    return torch.load(path, map_location=device, weights_only=True, mmap=mmap)


def model_weights(path, checkpoint):
    """The whole model's state dict of a checkpoint that load_checkpoint(path) returned, sharded or not."""
    return load_full_weights(path) if checkpoint["model"] == SHARDED else checkpoint["model"]


def list_checkpoints(out_dir):
    """(step, path) of every checkpoint in out_dir, newest first; at equal steps ckpt_ before best_."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        match = CHECKPOINT_NAME.match(name)
        if match:
            found.append((int(match.group(2)), match.group(1) == "ckpt", os.path.join(out_dir, name)))
    return [(step, path) for step, _, path in sorted(found, reverse=True)]


def try_load(path, required=REQUIRED_KEYS, mmap=False):
    """(checkpoint, None) when `path` loads, matches its checksum and has every required part, else (None,
    the reason)."""
    if not is_sharded_checkpoint(path) and not zipfile.is_zipfile(path):
        return None, "not a checkpoint: train.py writes ckpt_STEP.pt / best_STEP.pt zip files (or .dcp folders)"
    try:
        checkpoint = load_checkpoint(path, mmap=mmap)
        problem = checksum_problem(path, checkpoint)
    except Exception as e:  # truncated zip, bad pickle, unreadable file: all mean "not usable"
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if problem:
        return None, problem
    missing = [k for k in required if not isinstance(checkpoint, dict) or k not in checkpoint]
    return (None, f"missing {', '.join(missing)}") if missing else (checkpoint, None)


def latest_valid(out_dir, warn=print, advice="give one checkpoint that is usable"):
    """(path, checkpoint) of the newest usable checkpoint, or (None, None) when out_dir holds none; warns about
    each broken one skipped. When out_dir holds checkpoints and none is usable, a ConfigError names them and
    `advice`: a run never starts over by itself."""
    found = list_checkpoints(out_dir)
    problems = []
    for _, path in found:
        checkpoint, problem = try_load(path)
        if checkpoint is not None:
            for skipped, why in problems:
                warn(f"warning: checkpoint {skipped} is unusable ({why}); falling back to the previous one")
            return path, checkpoint
        problems.append((path, problem))
    if found:
        problems = [f"{os.path.basename(path)}: {why}" for path, why in problems]
        raise ConfigError(f"{out_dir} holds checkpoints but none is usable ({'; '.join(problems)}): {advice}.")
    return None, None


def init_weights(path, config):
    """The model weights of checkpoint `path` (a .pt file or .dcp folder) for a new run of `config`
    (--init_from): step, optimizer and data start afresh. Refused when unusable or of another model shape."""
    checkpoint, problem = try_load(path, required=("model", "config"))
    if checkpoint is None:
        raise ConfigError(f"init_from '{path}' is unusable ({problem}).")
    differ = refused_keys(checkpoint["config"], config_to_dict(config), MODEL_SHAPE)
    if differ:
        raise ConfigError(f"init_from '{path}' holds another model shape: {'; '.join(differ)}. Set these keys to "
                          f"the checkpoint's values.")
    return model_weights(path, checkpoint)


def refused_keys(saved, requested, keys):
    """'key: X in the checkpoint, Y requested' for each of `keys` (in that order) whose values differ.
    A checkpoint written before the architecture switches existed holds GPT-2."""
    saved = {**ARCHITECTURES["gpt2"], **saved}
    return [f"{k}: {saved.get(k)!r} in the checkpoint, {requested[k]!r} requested" for k in keys
            if saved.get(k) != requested[k]]


def architecture_refusal(saved, requested):
    """One line when the checkpoint's architecture switches differ from the run's, else None."""
    differ = refused_keys(saved, requested, ARCHITECTURE_KEYS)
    if not differ:
        return None
    return (f"the checkpoint holds a --architecture={saved.get('architecture', 'gpt2')} model and this run asks for "
            f"--architecture={requested['architecture']} ({'; '.join(differ)}): resume with the checkpoint's "
            f"architecture and switches, or start a new run in another --out_dir.")


def compare_configs(saved, config):
    """Refuse a checkpoint of another model; return the other keys that differ as 'key: old -> new'."""
    requested = config_to_dict(config)
    saved = {"architecture": "gpt2", **ARCHITECTURES["gpt2"], **saved}  # a checkpoint from before the switches
    differ = [k for k in requested if k != "resume" and saved.get(k) != requested[k]]
    if refusal := architecture_refusal(saved, requested):
        raise ConfigError(refusal)  # one line: the switches, not a list of each shape key
    refused = refused_keys(saved, requested, RESUME_MUST_MATCH)
    if refused:
        raise ConfigError("the checkpoint holds a different model; differing keys:\n  " + "\n  ".join(refused) +
                          "\nResume with the checkpoint's values, or start a new run in another --out_dir.")
    return [f"{k}: {saved.get(k)!r} -> {requested[k]!r}" for k in differ]


def rng_state(device):
    """This process's random states as tensors and plain data (weights_only-loadable)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": np_state["state"]["pos"],
                  "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]},
        "torch": torch.get_rng_state(),
    }
    if str(device).startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    numpy = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": numpy["key"].numpy().astype(np.uint32),
                         "pos": numpy["pos"]}, "has_gauss": numpy["has_gauss"], "gauss": numpy["gauss"]})
    torch.set_rng_state(state["torch"])
    if str(device).startswith("cuda") and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def trim_metrics(out_dir, step):
    """Drop metrics.jsonl records from `step` on (the resumed run writes them again); returns them."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = f.readlines()
    kept, cut = [], []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        (kept if not isinstance(record, dict) or record.get("step", -1) < step else cut).append(line)
    if cut:
        atomic_write(path, lambda f: f.write("".join(kept).encode()))  # a kill mid-trim loses no record
    return cut


def set_aside(out_dir, after_step, metrics_lines=()):
    """Move the checkpoints of out_dir newer than `after_step` into a new folder out_dir/set_aside/TIME_step_S/
    (S: the step the new timeline starts from), with `metrics_lines` as its metrics.jsonl: an older timeline
    is kept, never deleted, and --resume=auto no longer sees it. Returns the folder, or None when nothing moved."""
    newer = [path for step, path in list_checkpoints(out_dir) if step > after_step]
    if not newer:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = folder = os.path.join(out_dir, SET_ASIDE, f"{stamp}_step_{max(after_step, 0):06d}")
    suffix = 1
    while os.path.exists(folder):  # two set-asides within a second
        folder, suffix = f"{base}.{suffix}", suffix + 1
    os.makedirs(folder)
    if metrics_lines:
        atomic_write(os.path.join(folder, "metrics.jsonl"), lambda f: f.write("".join(metrics_lines).encode()))
    for path in newer:
        os.replace(path, os.path.join(folder, os.path.basename(path)))  # same filesystem: a rename, no copy
    fsync_path(out_dir)
    return folder


def load_optimizer_state(optimizer, state, load=None):
    """Restore moments and step counts, but keep this run's hyperparameters: torch's load_state_dict would
    bring back the checkpoint's lr, weight decay and betas, silently undoing a --learning_rate=... override
    that the resume reports as a change."""
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    (load or optimizer.load_state_dict)(state)
    for group, hyper in zip(optimizer.param_groups, configured, strict=True):
        group.update(hyper)


def newer_elsewhere(config):
    """Under --resume=auto, a message when another rank's out_dir lists a newer checkpoint than rank 0's does
    (nodes without a shared filesystem restarted with another node as rank 0): resuming from an older one, or
    afresh, would be silent. Every rank calls it; only file names are read."""
    newest = list_checkpoints(config.out_dir)[:1]
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, newest[0] if newest else (-1, None))
    rank, (step, path) = max(enumerate(found), key=lambda item: item[1][0])
    if config.resume != "auto" or step <= found[0][0]:
        return None
    return (f"rank {rank} finds {path}, newer than any checkpoint in rank 0's out_dir, and only rank 0 reads "
            f"out_dir: restart with the node that holds it as rank 0, or copy it into rank 0's --out_dir.")
