"""Run logging on rank 0: one nanoGPT-style line per step, metrics.jsonl, W&B, and the summary a run ends with.

Other ranks get a logger whose methods do nothing, so the training loop never asks who it is.
"""

import configparser
import json
import math
import netrc
import os
import shlex
import shutil
import sys
import time
from urllib.parse import urlsplit

from config import ConfigError
from gpt2_pretrain import console
from gpt2_pretrain.checkpoint.files import list_checkpoints
from gpt2_pretrain.distributed import print0
from gpt2_pretrain.flops import format_mfu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: train.py, scripts/


DEFAULT_WANDB_HOST = "https://api.wandb.ai"


def _wandb_settings_files():
    """wandb's global settings file (WANDB_CONFIG_DIR or ~/.config/wandb) and the workspace one (./wandb)."""
    config_dir = os.environ.get("WANDB_CONFIG_DIR") or os.path.join(os.path.expanduser("~"), ".config", "wandb")
    return [os.path.join(config_dir, "settings"), os.path.join("wandb", "settings")]


def _wandb_settings():
    values = {}
    for path in _wandb_settings_files():  # the workspace file overrides the global one, as in wandb
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
        except (configparser.Error, OSError):
            continue
        if parser.has_section("default"):
            values.update(parser["default"])
    return values


def _netrc_path():
    """The file `wandb login` writes: $NETRC, else ~/.netrc, else ~/_netrc (Windows)."""
    if os.environ.get("NETRC"):
        return os.path.expanduser(os.environ["NETRC"])
    for name in (".netrc", "_netrc"):
        path = os.path.join(os.path.expanduser("~"), name)
        if os.path.isfile(path):
            return path
    return None


def wandb_logged_in():
    """Whether wandb would find credentials, looked up where wandb looks (no network, no wandb import).

    An API key or identity token file in the environment; a netrc entry with a password for the W&B
    host (WANDB_BASE_URL, else base_url in wandb's settings files, else api.wandb.ai); an api_key in
    wandb's settings files.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    settings = _wandb_settings()
    host = os.environ.get("WANDB_BASE_URL") or settings.get("base_url") or DEFAULT_WANDB_HOST
    path = _netrc_path()
    if path and os.path.isfile(path):
        try:
            entry = netrc.netrc(path).authenticators(urlsplit(host.rstrip("/")).netloc)
        except (netrc.NetrcParseError, OSError):
            entry = None
        if entry and entry[2]:
            return True
    return bool(settings.get("api_key"))


def resolve_wandb_mode(mode):
    """auto: WANDB_MODE if set, else online when logged in, else offline: no run fails for lack of an account."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    return "online" if wandb_logged_in() else "offline"


def duration(seconds):
    """42s, 3m05s, 2h03m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def data_size(n_bytes):
    """812 kB, 3.4 MB, 20.1 GB: small data does not read as 0.00 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes / 1e3:.0f} kB"


def format_line(metrics, max_steps=None):
    step = f"step {metrics['step']:5d}" + (f"/{max_steps}" if max_steps else "")
    parts = [step, f"loss {metrics['loss']:.4f}", f"lr {metrics['lr']:.4e}",
             f"norm {metrics['grad_norm']:.4f}", f"dt {metrics['dt_ms']:.0f}ms",
             f"tok/s {metrics['tokens_per_sec']:,.0f}"]
    if "elapsed_s" in metrics:
        parts.append(f"elapsed {duration(metrics['elapsed_s'])}")
    if "eta_s" in metrics:
        parts.append(f"eta {duration(metrics['eta_s'])}")
    if "mfu" in metrics:
        parts.append(f"mfu {format_mfu(metrics['mfu'])}")
    return " | ".join(parts)


class Progress:
    """Seconds since the run started, and the seconds left: the first logged step's time per step, then the
    mean time per step since it (evaluations and checkpoints included, so the estimate is of the wall time;
    the first step, the first evaluation and compilation left out)."""

    def __init__(self, run_started, max_steps):
        self.run_started, self.max_steps = run_started, max_steps
        self.first = None  # (time, step) when the first logged step was done

    def at(self, step, step_seconds):
        """{'elapsed_s', 'eta_s'} after step `step` is done; step_seconds: its own time."""
        now = time.time()
        if self.first is None:
            self.first = (now, step)
        if step > self.first[1]:
            step_seconds = (now - self.first[0]) / (step - self.first[1])
        return {"elapsed_s": round(now - self.run_started, 3),
                "eta_s": round(step_seconds * (self.max_steps - step - 1), 3)}


class Logger:
    def __init__(self, out_dir, enabled=True, wandb_mode="disabled", wandb_project=None, wandb_run_name=None,
                 config=None, wandb_run_id=None, max_steps=None):
        self.enabled = enabled
        self.max_steps = max_steps  # shown as step N/max_steps
        self.wandb = None
        self.wandb_run_id = wandb_run_id
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        mode = resolve_wandb_mode(wandb_mode)
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError:  # optional: a machine without it logs to stdout and metrics.jsonl
            if wandb_mode != "auto":
                raise ConfigError(f"--wandb_mode={wandb_mode} needs wandb, which is not installed: pip install wandb, "
                                  f"or use --wandb_mode=disabled.") from None
            print0("wandb is not installed: logging to stdout and metrics.jsonl only")
            return

        def start(mode):
            # resume="allow": continue the stored run id when there is one, else start that id afresh
            return wandb.init(project=wandb_project, name=wandb_run_name or None, config=config, mode=mode,
                              dir=out_dir, id=wandb_run_id, resume="allow" if wandb_run_id else None)

        try:
            run = start(mode)
        except Exception as e:  # wandb raises its own errors for a missing key, a bad key or no network
            if mode != "online":
                raise
            if wandb_mode == "online":
                raise ConfigError(f"W&B online mode could not start ({type(e).__name__}: {e}). Log in with "
                                  f"`wandb login` or set WANDB_API_KEY, or use --wandb_mode=offline.") from None
            print0(f"W&B online mode could not start ({type(e).__name__}: {e}); logging offline instead")
            run = start("offline")
        self.wandb = run
        self.wandb_run_id = run.id

    def log(self, metrics):
        """One step's metrics: the stdout line, a metrics.jsonl line, and W&B."""
        if not self.enabled:
            return
        if "loss" in metrics:
            print0(format_line(metrics, self.max_steps))
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        console.copy_to(os.path.join(os.path.dirname(self.metrics_path), "console.log"))  # the run has begun
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(wandb_keys(metrics), step=metrics["step"])

    def log_sample(self, step, text):
        if not self.enabled:
            return
        print0(f"sample at step {step}: {text!r}")
        if self.wandb is not None:
            import wandb

            self.wandb.log({"samples": wandb.Table(columns=["step", "text"], data=[[step, text]])}, step=step)

    def finish(self):
        console.end()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def short_path(path):
    """`path` from the current folder when it lies inside it, else absolute; quoted for a shell."""
    relative = os.path.relpath(path)
    return shlex.quote(os.path.abspath(path) if relative.startswith("..") else relative)


def python_command():
    """This interpreter as the user can type it: `python` when that is the one on PATH (an activated venv),
    else its path (.venv/bin/python)."""
    on_path = shutil.which("python")
    if on_path and os.path.abspath(on_path) == os.path.abspath(sys.executable):
        return "python"
    return short_path(sys.executable)


def script(*parts):
    """A file of this repository, as a path from the current folder, quoted for a shell."""
    return short_path(os.path.join(ROOT, *parts))


def val_losses(out_dir):
    """[(step, val_loss)] of the run's metrics.jsonl (a line cut short by a kill is skipped)."""
    found = []
    try:
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("val_loss") is not None:
                    found.append((record["step"], record["val_loss"]))
    except OSError:
        pass
    return found


def run_summary(config, argv, wall_seconds, step, stopped_by=None, can_sample=True, this_process=None):
    """The lines a run ends with: what it did, where its files are, and commands to go on from there.
    wall_seconds: the run's time over every process up to here; this_process: this process's part, when less."""
    out_dir, python = config.out_dir, python_command()
    where = shlex.quote(out_dir)
    how = f"stopped by {stopped_by}" if stopped_by else "finished"
    part = f" ({duration(this_process)} of it in this process)" if this_process is not None else ""
    lines = [f"run {how} at step {step}/{config.max_steps} in {duration(wall_seconds)}{part}",
             f"  tokens seen: {step * config.total_batch_size:,} ({step:,} steps of {config.total_batch_size:,})"]
    vals, checkpoints = val_losses(out_dir), list_checkpoints(out_dir)
    if vals:
        best_step, best = min(vals, key=lambda v: (v[1], v[0]))
        kept = [path for s, path in checkpoints if s == best_step]
        best_where = f", {kept[-1]}" if kept else ", no checkpoint kept at that step"
        last = "last" if stopped_by else "final"  # a stopped run has more to come
        lines.append(f"  val loss: {last} {vals[-1][1]:.4f} (step {vals[-1][0]}), best {best:.4f} "
                     f"(step {best_step}{best_where})")
    lines.append(f"  out_dir: {out_dir}")
    newest = next((path for _, path in checkpoints if os.path.basename(path).startswith("ckpt_")), None)
    if newest is None:
        return lines
    kept_args = [arg for arg in argv if not arg.startswith(("--max_steps=", "--resume="))]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"{python} {script('train.py')}"
    if world_size > 1:
        single_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) == world_size
        launcher = (f"torchrun --standalone --nproc_per_node={world_size} {script('train.py')}" if single_node
                    else f"torchrun [your torchrun options] {script('train.py')}")
    prompt = f" --prompt={shlex.quote(config.sample_prompt)}" if can_sample and config.sample_prompt else ""
    lines += [
        "next:",
        f"  sample:   {python} {script('scripts', 'sample.py')} {where}{prompt} --tokens=200",
        f"  plot:     {python} {script('scripts', 'plot.py')} {where} "
        f"--out {shlex.quote(os.path.join(out_dir, 'loss.png'))}",
        f"  export:   {python} {script('scripts', 'export_hf.py')} {shlex.quote(newest)} "
        f"{shlex.quote(os.path.join(out_dir, 'hf'))}",
        # a stopped run goes on to its own max_steps; a finished one (or one resumed past it) trains as long again
        "  continue: " + " ".join([launcher, *map(shlex.quote, kept_args), "--resume=auto",
                                   f"--max_steps={config.max_steps if stopped_by else step + config.max_steps}"]),
    ]
    if not stopped_by:
        lines.append(f"            (the {config.lr_schedule} schedule is stretched to the new max_steps: the lr rises "
                     f"from min_lr at once; the resumed run prints it before and after)")
    return lines


WANDB_NAMES = {"loss": "train/loss", "grad_norm": "train/grad_norm", "lr": "train/lr",
               "tokens_per_sec": "train/tokens_per_sec", "mfu": "train/mfu", "val_loss": "val/loss",
               "hellaswag_acc_norm": "hellaswag/acc_norm", "hellaswag_acc": "hellaswag/acc",
               "hellaswag_acc_per_token": "hellaswag/acc_per_token"}


def wandb_keys(metrics):
    return {WANDB_NAMES[k]: v for k, v in metrics.items() if k in WANDB_NAMES and v is not None}
