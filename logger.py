"""Run logging on rank 0: one nanoGPT-style line per step, metrics.jsonl, and W&B.

Other ranks get a logger whose methods do nothing, so the training loop never asks who it is.
"""

import configparser
import json
import math
import netrc
import os
from urllib.parse import urlsplit

from config import ConfigError


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


def format_line(metrics):
    parts = [f"step {metrics['step']:5d}", f"loss {metrics['loss']:.4f}", f"lr {metrics['lr']:.4e}",
             f"norm {metrics['grad_norm']:.4f}", f"dt {metrics['dt_ms']:.0f}ms",
             f"tok/s {metrics['tokens_per_sec']:,.0f}"]
    if "mfu" in metrics:
        parts.append("mfu n/a" if metrics["mfu"] is None else f"mfu {100 * metrics['mfu']:.1f}%")
    return " | ".join(parts)


class Logger:
    def __init__(self, out_dir, enabled=True, wandb_mode="disabled", wandb_project=None, wandb_run_name=None,
                 config=None, wandb_run_id=None):
        self.enabled = enabled
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
            self.print("wandb is not installed: logging to stdout and metrics.jsonl only")
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
            self.print(f"W&B online mode could not start ({type(e).__name__}: {e}); logging offline instead")
            run = start("offline")
        self.wandb = run
        self.wandb_run_id = run.id

    def print(self, *args, **kwargs):
        if self.enabled:
            print(*args, **kwargs, flush=True)

    def log(self, metrics):
        """One step's metrics: the stdout line, a metrics.jsonl line, and W&B."""
        if not self.enabled:
            return
        if "loss" in metrics:
            self.print(format_line(metrics))
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(wandb_keys(metrics), step=metrics["step"])

    def log_sample(self, step, text):
        if not self.enabled:
            return
        self.print(f"sample at step {step}: {text!r}")
        if self.wandb is not None:
            import wandb

            self.wandb.log({"samples": wandb.Table(columns=["step", "text"], data=[[step, text]])}, step=step)

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


WANDB_NAMES = {"loss": "train/loss", "grad_norm": "train/grad_norm", "lr": "train/lr",
               "tokens_per_sec": "train/tokens_per_sec", "mfu": "train/mfu", "val_loss": "val/loss",
               "hellaswag_acc_norm": "hellaswag/acc_norm", "hellaswag_acc": "hellaswag/acc"}


def wandb_keys(metrics):
    return {WANDB_NAMES[k]: v for k, v in metrics.items() if k in WANDB_NAMES and v is not None}
