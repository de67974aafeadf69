"""Checkpoints that survive anything: atomic writes, every rank's state, exact resume.

A checkpoint is one torch file of plain data, so `torch.load(weights_only=True)` reads it: model weights
(names without torch.compile's or DDP's prefixes), optimizer states, step, the resolved config, each
rank's loader and RNG states (python, numpy, torch CPU, CUDA), best val loss, the W&B run id, the digest
of the data manifest (a run is its data) and a checksum of all of it (checksum.py).
Files in out_dir: ckpt_STEP.pt (the last keep_last usable ones) and best_STEP.pt (lowest val loss so far);
set_aside/TIME_step_S/ holds what a resume at step S moved out of the way (the checkpoints after S of an
older timeline, or broken files skipped, with their metrics records), never deleted.
A sharded run (--parallel=fsdp) writes folders ckpt_STEP.dcp/ and best_STEP.dcp/ instead, each rank its own
shards (sharded.py). Reading, listing and checking checkpoint files: files.py.
A checkpoint at step s holds the state before step s's evaluation and update (best_val_loss included),
so a resumed run starts its loop at s and repeats exactly what the uninterrupted run did from there.
"""

import json
import math
import os
import shutil

import torch
import torch.distributed as dist

from config import ConfigError, config_to_dict
from gpt2_pretrain.atomic import atomic_save
from gpt2_pretrain.checkpoint.checksum import with_checksum
from gpt2_pretrain.checkpoint.files import (CHECKPOINT_NAME, SET_ASIDE, clean_state_dict, compare_configs,
                                            latest_valid, list_checkpoints, load_checkpoint, load_optimizer_state,
                                            newer_elsewhere, rng_state, set_aside, set_rng_state, trim_metrics,
                                            try_load)
from gpt2_pretrain.checkpoint.sharded import (SHARDED, is_sharded_checkpoint, link_copy, load_sharded,
                                              ranks_that_cannot_read, save_sharded, training_state, weights_finite)
from gpt2_pretrain.distributed import print0
from gpt2_pretrain.errors import failed_save_message


class Checkpointer:
    """Saves and restores the whole training state; every rank calls save() and resume() together."""

    def __init__(self, config, info, model, optimizers, loader):
        self.config, self.info = config, info
        self.model, self.optimizers, self.loader = model, optimizers, loader
        self.sharded = config.parallel == "fsdp"  # each rank writes its shards with DCP, into a folder
        self.suffix = ".dcp" if self.sharded else ".pt"
        self.best_val_loss = math.inf
        self.wandb_run_id = None  # the resumed run's W&B id (the logger continues it), None when fresh
        self.nonfinite_steps = 0  # the resumed run's count of skipped NaN/inf steps
        self.run_seconds = 0.0  # the resumed run's time up to its checkpoint, over the processes before this one
        self.resumed_config = None  # the resumed checkpoint's config, as a dict
        self.start_step = 0
        self.last_saved = None  # (step, path) of the newest checkpoint written or resumed from
        self.start_path = None  # the checkpoint this run resumed from: never pruned by it
        self.timeline_note = None  # set when resume() moved an older timeline aside: the summary repeats it
        self._usable = {}  # (path, inode, size, mtime) -> whether the file passed try_load: pruning counts those
        self._rank_state = None

    def _pick_on_rank0(self):
        """Rank 0's choice: (path, checkpoint) or (None, None); raises ConfigError for a refused one."""
        config, out_dir = self.config, self.config.out_dir
        if config.resume == "never":
            existing = list_checkpoints(out_dir)
            usable = next((path for _, path in existing if try_load(path, mmap=True)[0] is not None), None)
            if usable:
                raise ConfigError(f"--resume=never but {out_dir} already holds checkpoints ({usable}): "
                                  f"continue them with --resume=auto, or start over in another --out_dir.")
            return None, None  # the unusable ones, if any, are set aside by resume()
        if config.resume == "auto":
            return latest_valid(out_dir, warn=print0, advice=(
                "resume from another checkpoint with --resume=PATH, or start over on purpose with "
                "--resume=never (the unusable files are then moved into a set_aside/ folder of out_dir, not "
                "deleted)"))
        if not (os.path.isfile(config.resume) or is_sharded_checkpoint(config.resume)):
            raise ConfigError(f"--resume={config.resume}: no such checkpoint file or .dcp folder (use auto, never "
                              f"or a path).")
        aside = os.path.abspath(os.path.join(out_dir, SET_ASIDE))
        if os.path.commonpath([os.path.abspath(config.resume), aside]) == aside:
            # out_dir's checkpoints up to the rollback step belong to the new timeline: the two would mix
            raise ConfigError(f"--resume={config.resume} is a set-aside timeline of {out_dir}, whose checkpoints "
                              f"now belong to another one: continue it in a folder of its own, --resume="
                              f"{config.resume} --out_dir=ANOTHER_FOLDER.")
        checkpoint, problem = try_load(config.resume)
        if checkpoint is None:
            raise ConfigError(f"checkpoint {config.resume} is unusable ({problem}).")
        return config.resume, checkpoint

    def _pick_and_broadcast(self):
        """Rank 0 picks the checkpoint (or none) and sends its contents to every rank: other nodes need no
        copy of out_dir, which without a shared filesystem only rank 0's node has. (path, checkpoint)"""
        path, checkpoint, problem = None, None, None
        if self.info.is_master:
            try:
                path, checkpoint = self._pick_on_rank0()
            except ConfigError as e:
                problem = str(e)  # every rank raises it below: none is left waiting for the broadcast
        if self.info.ddp:
            problem = newer_elsewhere(self.config) or problem  # collective: every rank calls it
            box = [path, None if problem else checkpoint, problem]
            dist.broadcast_object_list(box, src=0)
            path, checkpoint, problem = box
        if problem is not None:
            raise ConfigError(problem)
        return path, checkpoint

    def resume(self):
        """Restore weights, optimizers, loader and counters from the chosen checkpoint; return the start step."""
        path, checkpoint = self._pick_and_broadcast()
        if path is not None:
            self._check_data(path, checkpoint)
            for change in compare_configs(checkpoint["config"], self.config):
                print0(f"resume: config changed since the checkpoint, {change}")
            if checkpoint["model"] == SHARDED:
                self._check_every_rank_reads(path)
                load_sharded(path, self.model, self.optimizers, load_optimizer_state)
            elif self.sharded:
                raise ConfigError(f"checkpoint {path} is from a --parallel=ddp run: resume it with --parallel=ddp.")
            else:
                self.model.load_state_dict(checkpoint["model"])
                for optimizer, state in zip(self.optimizers, checkpoint["optimizers"], strict=True):
                    load_optimizer_state(optimizer, state)
            ranks = checkpoint["ranks"]
            if len(ranks) != self.info.world_size:
                print0(f"resume: world size {len(ranks)} -> {self.info.world_size}: the data order is kept, "
                       f"random states are reused round robin")
            self._rank_state = ranks[self.info.rank % len(ranks)]
            self.loader.load_state_dict(ranks[0]["loader"] if len(ranks) != self.info.world_size
                                        else self._rank_state["loader"])
            self.start_step = checkpoint["step"]
            self.best_val_loss = checkpoint.get("best_val_loss", math.inf)
            self.wandb_run_id = checkpoint.get("wandb_run_id")
            self.nonfinite_steps = checkpoint.get("nonfinite_steps", 0)
            self.run_seconds = checkpoint.get("run_seconds", 0.0)
            self.resumed_config = checkpoint["config"]
            self.last_saved = (self.start_step, path)
            self.start_path = path
            if self.info.is_master:
                self._known_usable(path)  # checked by try_load just now: pruning need not read it again
            print0(f"resumed from {path} at step {self.start_step}")
            if self.start_step == self.config.max_steps:
                print0(f"the checkpoint is at max_steps={self.config.max_steps}: raise --max_steps to train on")
            elif self.start_step > self.config.max_steps:
                print0(f"the checkpoint is at step {self.start_step}, past --max_steps={self.config.max_steps}: "
                       f"nothing to train; give --max_steps above {self.start_step} to train on")
        if self.info.is_master:
            self._new_timeline(path)
        return self.start_step

    def _check_data(self, path, checkpoint):
        """A run is its data: resuming it on another data_dir manifest is refused, with the deliberate way."""
        data = checkpoint.get("data")  # absent in checkpoints written before it was kept
        if data is None or data["manifest_sha256"] == self.loader.manifest_digest:
            return
        raise ConfigError(
            f"--data_dir={self.config.data_dir} holds other data than {path} was trained on (--data_dir="
            f"{data['data_dir']}: another manifest.json) and a run is its data. To go on training that model on "
            f"this data, start a new run from its weights: --init_from={path} --out_dir=ANOTHER_FOLDER; to "
            f"resume this run, give its own --data_dir={data['data_dir']}.")

    def _new_timeline(self, path):
        """Rank 0, after a resume (or a fresh start): metrics.jsonl is cut back to the start step, and the
        checkpoints newer than it (a rollback's old timeline, or broken files skipped) are moved aside with
        the records cut, so that every later --resume=auto continues from here."""
        out_dir = self.config.out_dir
        cut = trim_metrics(out_dir, self.start_step)
        folder = set_aside(out_dir, self.start_step if path is not None else -1, cut)
        if folder is None:
            return
        newest = max(int(CHECKPOINT_NAME.match(name).group(2)) for name in os.listdir(folder)
                     if CHECKPOINT_NAME.match(name))
        what = f"resumed from {path} at step {self.start_step}" if path else "started over at step 0"
        self.timeline_note = (f"new timeline: {what}; the checkpoints after it (up to step {newest}) and their "
                              f"metrics were moved into {folder}")
        print0(self.timeline_note)
        with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": self.start_step, "new_timeline": {
                "resumed_from": path, "set_aside": folder, "newest_set_aside": newest}}) + "\n")

    def _check_every_rank_reads(self, path):
        """A sharded checkpoint is read by every rank: one outside out_dir (--resume=PATH) may be on rank 0's
        node only, which check_shared_out_dir does not cover. Every rank raises the same error then."""
        blind = ranks_that_cannot_read(path) if self.info.ddp else []
        if blind:
            ranks = f"rank {blind[0]}" if len(blind) == 1 else f"ranks {', '.join(map(str, blind))}"
            raise ConfigError(f"--resume={path}: {ranks} cannot read this sharded checkpoint, and every rank reads "
                              f"its own shards: give a path every node sees (a shared filesystem), or copy the "
                              f"folder to that path on every node.")

    def restore_rng(self):
        """Put back this rank's random states; call last before the loop so nothing draws from them first."""
        if self._rank_state is not None:
            set_rng_state(self._rank_state["rng"], self.info.device)

    def _state(self, step, counters):
        """The whole checkpoint on rank 0 (None elsewhere): each rank's loader and RNG states are gathered."""
        rank_state = {"rng": rng_state(self.info.device), "loader": self.loader.state_dict()}
        ranks = [rank_state]
        if self.info.ddp:
            ranks = [None] * self.info.world_size
            dist.all_gather_object(ranks, rank_state)
        if not self.info.is_master:
            return None
        return {
            "model": SHARDED if self.sharded else clean_state_dict(self.model),
            "optimizers": SHARDED if self.sharded else [optimizer.state_dict() for optimizer in self.optimizers],
            "step": step,
            "config": config_to_dict(self.config),
            "ranks": ranks,
            "world_size": self.info.world_size,
            "best_val_loss": self.best_val_loss,
            "wandb_run_id": counters["wandb_run_id"],
            "nonfinite_steps": counters["nonfinite_steps"],
            "run_seconds": counters.get("run_seconds", 0.0),
            "data": {"manifest_sha256": self.loader.manifest_digest, "data_dir": self.config.data_dir},
        }

    def _write(self, checkpoint, path, final=False):
        """Rank 0 writes (every rank its shards when sharded), unless a weight is NaN/inf: a non-finite model
        is never saved. A failed write (a full disk) keeps the older files; the run goes on, unless this is
        its final save."""
        if self.sharded:
            if not weights_finite(self.model):
                print0(f"warning: weights are non-finite: not saving {path}")
                return False
            try:
                save_sharded(checkpoint, path, self.model, self.optimizers)
            except OSError as e:  # the same error on every rank
                return self._failed(path, [checkpoint, training_state(self.model, self.optimizers)], e, final)
            if self.info.is_master:
                self._known_usable(path)
        elif checkpoint is None:
            return False
        elif not all(torch.isfinite(t).all() for t in checkpoint["model"].values()):
            print0(f"warning: weights are non-finite at step {checkpoint['step']}: not saving {path}")
            return False
        else:
            try:
                atomic_save(with_checksum(checkpoint), path)
            except OSError as e:
                return self._failed(path, checkpoint, e, final)
            self._known_usable(path)
        print0(f"saved checkpoint {path}")
        return True

    def _failed(self, path, checkpoint, error, final):
        """After a failed write of `checkpoint` (its tensors say how much space it needs): a warning and False,
        or at the final save a ConfigError. Sharded, every rank is here and gets rank 0's words, printed once."""
        problem = None
        if self.info.is_master:
            kept = (list_checkpoints(self.config.out_dir) or [(None, "none")])[0][1]
            problem = failed_save_message(path, checkpoint, error, kept)
        if self.sharded and self.info.ddp:
            box = [problem]
            dist.broadcast_object_list(box, src=0)
            problem = box[0]
        if final:
            raise ConfigError(f"{problem}. Free some space, then continue with --resume=auto.") from None
        print0(f"warning: {problem}. Training goes on and tries again at the next checkpoint.")
        return False

    def due(self, step, final):
        """Whether the loop saves at `step`: every checkpoint_interval steps, and at the run's last step."""
        return step > self.start_step and (final or step % self.config.checkpoint_interval == 0)

    def save(self, step, final, counters):
        """Write ckpt_STEP; `final` (end of training, a stop signal): a failed write stops the run.
        counters: {"nonfinite_steps": ..., "wandb_run_id": ...} as the run has them now."""
        checkpoint = self._state(step, counters)
        path = os.path.join(self.config.out_dir, f"ckpt_{step:06d}{self.suffix}")
        if self._write(checkpoint, path, final=final) and self.info.is_master:
            self.prune(path)
        self.last_saved = (step, path)

    def update_best(self, step, val_loss, counters):
        """After an evaluation: a new best val loss gets best_STEP.pt, and is the best only once that file is
        there: after a failed write (a full disk) the previous best stays the one to beat."""
        previous = self.best_val_loss
        path = os.path.join(self.config.out_dir, f"best_{step:06d}{self.suffix}")
        try:
            self._write_best(step, val_loss, counters)
        except OSError as e:  # rank 0 alone, linking or copying ckpt_STEP: no collective is left waiting
            print0(f"warning: could not write {path} ({e}); training goes on")
        if self.config.keep_best and self.best_val_loss != previous and not self._exists_on_rank0(path):
            self.best_val_loss = previous

    def _exists_on_rank0(self, path):
        """Whether rank 0 sees `path` (only its node may hold out_dir), told to every rank."""
        box = [os.path.exists(path) if self.info.is_master else None]
        if self.info.ddp:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def _write_best(self, step, val_loss, counters):
        """Write best_STEP (a hard link when ckpt_STEP.pt exists) for a new best val loss."""
        if step == 0 or not val_loss < self.best_val_loss:
            return  # the random init is no checkpoint to keep
        self.best_val_loss = val_loss
        if not self.config.keep_best:
            return
        path = os.path.join(self.config.out_dir, f"best_{step:06d}{self.suffix}")
        if self.last_saved is not None and self.last_saved[0] == step:
            if self.info.is_master and os.path.exists(self.last_saved[1]) and not os.path.exists(path):
                if self.sharded:
                    link_copy(self.last_saved[1], path)  # a folder of hard links to the same shard files
                else:
                    try:
                        os.link(self.last_saved[1], path)
                    except OSError:
                        atomic_save(load_checkpoint(self.last_saved[1]), path)  # no hard links on this filesystem
                self._known_usable(path)
                self.prune(path)
            return
        checkpoint = self._state(step, counters)
        if self._write(checkpoint, path) and self.info.is_master:
            self.prune(path)

    def _key(self, path):
        stat = os.stat(path)
        return path, stat.st_ino, stat.st_size, stat.st_mtime_ns

    def _known_usable(self, path):
        """A file this run just wrote (or linked from one): usable without reading it back."""
        self._usable[self._key(path)] = True

    def _is_usable(self, path):
        try:
            key = self._key(path)
        except OSError:
            return False
        if key not in self._usable:
            self._usable[key] = try_load(path, mmap=True)[0] is not None  # once per file and run
        return self._usable[key]

    def prune(self, written):
        """Keep the newest keep_last usable ckpt_ files and the newest usable best_ one, of the steps up to the
        one just `written`; never remove that one, the one the run started from, nor an unusable file (a broken
        file is neither counted nor deleted: it stays for its owner to look at). Removes leftovers of killed
        saves."""
        out_dir = self.config.out_dir
        step_written = int(CHECKPOINT_NAME.match(os.path.basename(written)).group(2))
        spared = {os.path.abspath(written)} | ({os.path.abspath(self.start_path)} if self.start_path else set())
        usable = [(step, path) for step, path in list_checkpoints(out_dir)
                  if step <= step_written and self._is_usable(path)]  # newest first
        ckpts = [path for _, path in usable if os.path.basename(path).startswith("ckpt_")]
        bests = [path for _, path in usable if os.path.basename(path).startswith("best_")]
        doomed = bests[1:] + (ckpts[self.config.keep_last:] if self.config.keep_last > 0 else [])
        doomed = [path for path in doomed if os.path.abspath(path) not in spared]
        doomed += [os.path.join(out_dir, n) for n in os.listdir(out_dir) if ".pt.tmp." in n or n.endswith(".dcp.tmp")]
        for path in doomed:
            try:
                os.remove(path)
            except IsADirectoryError:
                shutil.rmtree(path, ignore_errors=True)  # a sharded checkpoint
            except FileNotFoundError:
                pass
