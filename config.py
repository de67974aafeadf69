"""Training configuration: one dataclass holds every key, its type, default and help line.

    python train.py [CONFIG.py ...] [--key=value ...]

Config files are plain `key = value` Python files, applied left to right; then the `--key=value` flags,
which override every config file wherever they stand on the command line. Unknown keys and values of the
wrong type are refused with a message naming the key.
Defaults are the GPT-2 124M FineWeb-Edu recipe (GPT-3 paper appendix, as build-nanogpt uses it).
"""

import ast
import dataclasses
import difflib
import inspect
import json
import os
import re
from dataclasses import dataclass

from data.tokenizer import N_VOCAB
from gpt2_pretrain.atomic import atomic_write


class ConfigError(Exception):
    """A mistake in the user's configuration: reported as one message, no traceback."""


@dataclass
class TrainConfig:
    # model
    n_layer: int = 12  # number of transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # width of the residual stream
    block_size: int = 1024  # context length in tokens
    vocab_size: int = 50304  # GPT-2's 50257 tokens padded to a multiple of 128
    dropout: float = 0.0  # dropout probability (0 for pretraining)
    tie_embeddings: bool = True  # share the token embedding with lm_head, as GPT-2 does (modern: false)
    architecture: str = "gpt2"  # gpt2 | modern: sets the defaults of the switches here marked (modern: ...)
    rotary: bool = False  # rotary position embeddings on q and k, no learned wpe (modern: true)
    qk_norm: bool = False  # RMS-normalise q and k per head, without parameters (modern: true)
    mlp: str = "gelu"  # gelu (tanh approximation) | relu2: relu(x)^2 (modern: relu2)
    norm: str = "layernorm"  # layernorm (gain and bias) | rmsnorm (no parameters) (modern: rmsnorm)
    zero_init: bool = False  # attn.c_proj and mlp.c_proj start at zero: each block starts as identity (modern: true)
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap); 0 off (modern: 15.0)
    init_from: str = ""  # start from a GPT-2 folder (config.json + model.safetensors) or a checkpoint's weights
    # data
    data_dir: str = "data/fineweb10B"  # folder of uint16 .npy shards and manifest.json (data/prepare.py)
    shuffle: bool = True  # visit shards and windows in an order shuffled from the seed each epoch
    # batch
    batch_size: int = 64  # sequences per micro-step per process; auto: the largest power of two that fits in memory
    total_batch_size: int = 524288  # tokens per optimizer step, over all processes and micro-steps (2**19)
    memory_limit_gb: float = 0.0  # GiB per process that --batch_size=auto may plan for (0: the device's free memory)
    # optimizer and schedule
    optimizer: str = "adamw"  # adamw | muon (Muon for hidden matrices, AdamW for the rest)
    max_steps: int = 19073  # optimizer steps; 19073 * 2**19 tokens is one pass over 10B tokens
    warmup_steps: int = 715  # linear warmup steps before the cosine decay
    lr_schedule: str = "cosine"  # cosine (decay after the warmup) | wsd (constant, then linear decay: warmdown_frac)
    warmdown_frac: float = 0.2  # wsd: the last fraction of max_steps, over which the lr decays linearly to min_lr
    learning_rate: float = 6e-4  # peak learning rate (AdamW)
    min_lr: float = 6e-5  # learning rate reached at max_steps and kept after
    weight_decay: float = 0.1  # AdamW weight decay on matmul and embedding weights only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 disables)
    # evaluation and sampling
    eval_interval: int = 250  # steps between val loss evaluations and samples
    eval_iters: int = 20  # val micro-batches of batch_size sequences, spread over the val split; -1: all of it; 0: none
    sample_tokens: int = 32  # tokens generated for the sample at each evaluation (0 disables)
    sample_prompt: str = "Hello, I'm a language model,"  # prompt of the sample at each evaluation
    hellaswag: bool = False  # HellaSwag acc, acc_norm, acc_per_token at each evaluation (downloads the val set once)
    hellaswag_path: str = "data/hellaswag/hellaswag_val.jsonl"  # HellaSwag val jsonl (fetched if missing)
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    compile: bool = False  # torch.compile the model
    parallel: str = "ddp"  # ddp (every process holds the whole model) | fsdp (weights, grads, optimizer state sharded)
    activation_checkpointing: str = "none"  # none | full (recompute every block in the backward) | selective
    ac_every: int = 2  # selective activation checkpointing: checkpoint every N-th block, the first one included
    seed: int = 1337  # seed for model init, data order and sampling
    out_dir: str = "out"  # folder for config.json, metrics.jsonl and checkpoints
    log_interval: int = 1  # steps between log lines
    dry_run: bool = False  # print the resolved config and what follows from it, then exit without training
    # tracking
    wandb_mode: str = "auto"  # auto (online if logged in, else offline) | online | offline | disabled
    wandb_project: str = "gpt2-pretrain"  # W&B project name
    wandb_run_name: str = ""  # W&B run name (empty: W&B picks one)
    peak_flops: float = 0.0  # peak FLOP/s of one device for MFU (0: look up the GPU's dense bf16 peak)
    # checkpoints
    checkpoint_interval: int = 500  # steps between checkpoints; one also at the end and on a stop signal
    stop_check_interval: int = 10  # steps between the ranks' checks for a stop signal under torchrun, at most
    stop_grace: float = 20.0  # seconds from a stop signal to its checkpoint, at most (torchrun and Slurm kill at 30)
    keep_last: int = 2  # ckpt_STEP.pt files kept in out_dir (0 keeps all), besides the best-val one
    keep_best: bool = True  # also keep best_STEP.pt, the checkpoint with the lowest val loss so far
    resume: str = "auto"  # auto (latest valid checkpoint in out_dir, else start fresh) | never | PATH to a checkpoint
    max_nonfinite_steps: int = 10  # NaN/inf steps in a row (each one's update skipped) before the run stops
    hang_timeout_s: float = 600.0  # under torchrun: seconds without a step before a rank writes its stacks and exits
    # muon (used with --optimizer=muon)
    matrix_lr: float = 0.02  # Muon lr for the 2-D matrices inside the blocks
    embedding_lr: float = 0.005  # AdamW lr for wpe and an untied wte, times (n_embd/768)**-0.5
    unembedding_lr: float = 0.004  # AdamW lr for lm_head (and wte tied to it), times (n_embd/768)**-0.5
    muon_momentum: float = 0.95  # Muon momentum, warmed from 0.85 over the first 300 steps


CHOICES = {
    "architecture": ("gpt2", "modern"),
    "mlp": ("gelu", "relu2"),
    "lr_schedule": ("cosine", "wsd"),
    "norm": ("layernorm", "rmsnorm"),
    "optimizer": ("adamw", "muon"),
    "parallel": ("ddp", "fsdp"),
    "activation_checkpointing": ("none", "full", "selective"),
    "wandb_mode": ("auto", "online", "offline", "disabled"),
}
# keys that also take a word besides a value of their type: batch_size=auto is resolved before the run starts
# (gpt2_pretrain/auto_batch.py), so the run, its config.json and its checkpoints see a number
ALSO_ACCEPTS = {"batch_size": "auto"}


# the switches each --architecture sets, unless a config file or flag sets them itself (so an ablation is one
# flag: --architecture=modern --qk_norm=false); gpt2 is TrainConfig's defaults, and what a checkpoint written
# before these keys existed holds
ARCHITECTURES = {
    "gpt2": dict(tie_embeddings=True, rotary=False, qk_norm=False, mlp="gelu", norm="layernorm", zero_init=False,
                 logit_softcap=0.0),
    "modern": dict(tie_embeddings=False, rotary=True, qk_norm=True, mlp="relu2", norm="rmsnorm", zero_init=True,
                   logit_softcap=15.0),
}
ARCHITECTURE_KEYS = tuple(ARCHITECTURES["gpt2"])


def field_help():
    """Map each key to the comment written beside it in TrainConfig's source."""
    source = inspect.getsource(TrainConfig)
    found = re.findall(r"^\s+(\w+): \w+ = .*?  # (.*)$", source, flags=re.MULTILINE)
    return dict(found)


def field_groups():
    """[(group, [key, ...])] in TrainConfig's order, from its '# group' comment lines."""
    groups = []
    for line in inspect.getsource(TrainConfig).splitlines():
        if match := re.match(r"^    # (.+)$", line):
            groups.append((match.group(1), []))
        elif (match := re.match(r"^    (\w+): \w+ = ", line)) and groups:
            groups[-1][1].append(match.group(1))
    return groups


def help_text(column=34):
    """Every key with its default and help, the help in one column (a longer flag puts it on the next line)."""
    helps = field_help()
    lines = ["usage: python train.py [CONFIG.py ...] [--key=value ...]", "",
             "Config files apply left to right; --key=value flags override them wherever they stand.", "",
             "keys (default):"]
    for group, keys in field_groups():
        lines.append(f"  {group}:")
        for key in keys:
            flag = f"    --{key}={getattr(TrainConfig, key)!r}"
            if len(flag) >= column:
                lines.append(flag)
                flag = ""
            lines.append(f"{flag:<{column}}{helps.get(key, '')}")
    return "\n".join(lines)


def format_config(config, width=100):
    """The resolved config, one group of keys to a line (wrapped at about `width` characters)."""
    values, groups = config_to_dict(config), [(g.split(" (")[0], keys) for g, keys in field_groups()]
    indent = 4 + max(len(group) for group, _ in groups)
    lines = ["config:"]
    for group, keys in groups:
        line = f"  {group + ':':<{indent - 2}}"
        for key in keys:
            item = f"{key}={values[key]!r}"
            if len(line) + len(item) > width and len(line) > indent:
                lines.append(line.rstrip())
                line = " " * indent
            line += item + "  "
        lines.append(line.rstrip())
    return "\n".join(lines)


def _unknown_key(key, source):
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else " Run `python train.py --help` to list the keys."
    return ConfigError(f"unknown config key '{key}' in {source}.{hint}")


def _convert(key, value, target, source):
    """Coerce `value` (a Python object, or a string from the command line) to the field's type."""
    if key in ALSO_ACCEPTS and isinstance(value, str) and value.strip() == ALSO_ACCEPTS[key]:
        return ALSO_ACCEPTS[key]
    if isinstance(value, str) and target is not str:
        text = value.strip()
        if target is bool and text.lower() in ("true", "false", "1", "0", "yes", "no"):
            return text.lower() in ("true", "1", "yes")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            pass
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if target is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # allow 1e8 for an integer key
    if not isinstance(value, target) or (target is int and isinstance(value, bool)):
        word = f" or '{ALSO_ACCEPTS[key]}'" if key in ALSO_ACCEPTS else ""
        raise ConfigError(
            f"config key '{key}' in {source} expects {target.__name__}{word}, got {value!r} "
            f"({type(value).__name__})."
        )
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"config key '{key}' in {source} must be one of {', '.join(CHOICES[key])}; got {value!r}.")
    return value


def read_config_file(path):
    """Run a `key = value` config file in its own namespace and return the values it set."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' not found. Config files live in configs/, "
                          f"e.g. configs/shakespeare.py.")
    namespace = {}
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{path}' could not be read ({e}): a config file is UTF-8 Python text "
                          f"of `key = value` lines.") from None
    try:
        exec(compile(source, path, "exec"), namespace)
    except (Exception, SystemExit) as e:  # SystemExit: a file that calls sys.exit() or exit()
        raise ConfigError(f"config file '{path}' could not be read: {type(e).__name__}: {e}") from None
    return {k: v for k, v in namespace.items() if not k.startswith("_") and not inspect.ismodule(v)}


def load_config(argv):
    """Build a TrainConfig from config files (left to right), then --key=value flags (left to right).

    Flags win wherever they stand: `--max_steps=10 configs/shakespeare.py` runs 10 steps."""
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for flag, following in zip(argv, argv[1:]):  # `--max_steps 100`: the 100 would be read as a config file
        key = flag[2:].replace("-", "_")
        if flag.startswith("--") and "=" not in flag and types.get(key) not in (None, bool) and \
                not following.startswith("-") and not os.path.isfile(following):
            raise ConfigError(f"'{flag} {following}': flags take --key=value, with no space: write {flag}={following}.")
    files = [arg for arg in argv if not arg.startswith("-")]
    flags = [arg for arg in argv if arg.startswith("-")]
    values = {}
    for arg in files + flags:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            source = f"flag '{arg}'"
            if not eq:
                if types.get(key) is not bool:
                    raise ConfigError(f"flag '{arg}' needs a value: write --{key}=VALUE.")
                value = "true"
            updates = {key.replace("-", "_"): value}
        elif arg.startswith("-"):
            raise ConfigError(f"'{arg}' is not a flag: write flags as --key=value (two dashes, no spaces).")
        else:
            source = f"config file '{arg}'"
            updates = read_config_file(arg)
        for key, value in updates.items():
            if key not in types:
                raise _unknown_key(key, source)
            values[key] = _convert(key, value, types[key], source)
    for key, value in ARCHITECTURES[values.get("architecture", TrainConfig.architecture)].items():
        values.setdefault(key, value)  # a switch set by a file or flag wins over its architecture's value
    config = TrainConfig(**values)
    check_config(config)
    return config


def check_config(config):
    positive = ["n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size", "total_batch_size",
                "max_steps", "eval_interval", "log_interval"]
    positive += ["checkpoint_interval", "max_nonfinite_steps", "stop_check_interval", "stop_grace", "ac_every",
                 "hang_timeout_s"]
    for key in positive:
        if getattr(config, key) != ALSO_ACCEPTS.get(key) and getattr(config, key) <= 0:
            raise ConfigError(f"config key '{key}' must be positive; got {getattr(config, key)}.")
    if config.n_embd % config.n_head:
        raise ConfigError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head}).")
    if config.rotary and (config.n_embd // config.n_head) % 2:
        raise ConfigError(f"--rotary rotates pairs of a head's channels: n_embd / n_head ({config.n_embd} / "
                          f"{config.n_head}) must be even; change n_embd or n_head, or set --rotary=false.")
    if config.eval_iters < -1:
        raise ConfigError(f"config key 'eval_iters' must be -1 (all of val), 0 (no evaluation) or positive; "
                          f"got {config.eval_iters}.")
    for key in ("warmup_steps", "keep_last", "sample_tokens", "seed"):
        if getattr(config, key) < 0:
            raise ConfigError(f"config key '{key}' must not be negative; got {getattr(config, key)}.")
    if not 0 <= config.warmdown_frac <= 1:
        raise ConfigError(f"config key 'warmdown_frac' must be in [0, 1] (a fraction of max_steps); got "
                          f"{config.warmdown_frac}.")
    for key in ("dropout", "beta1", "beta2"):
        if not 0 <= getattr(config, key) < 1:
            raise ConfigError(f"config key '{key}' must be in [0, 1); got {getattr(config, key)}.")
    for key in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "matrix_lr", "embedding_lr",
                "unembedding_lr", "logit_softcap"):
        if not 0 <= getattr(config, key) < float("inf"):
            raise ConfigError(f"config key '{key}' must be a finite number >= 0; got {getattr(config, key)}.")
    if config.learning_rate == 0:  # the schedule scales each group's lr by lr / learning_rate
        raise ConfigError("config key 'learning_rate' must be positive; got 0.0. The other lrs (min_lr, and "
                          "Muon's matrix_lr ...) follow its schedule.")
    if config.peak_flops < 0:
        raise ConfigError(f"peak_flops must not be negative; got {config.peak_flops}.")
    if not 0 <= config.memory_limit_gb < float("inf"):
        raise ConfigError(f"config key 'memory_limit_gb' must be a finite number >= 0 (0: the device's free "
                          f"memory); got {config.memory_limit_gb}.")
    if config.min_lr > config.learning_rate:
        raise ConfigError(f"min_lr ({config.min_lr}) must not exceed learning_rate ({config.learning_rate}).")
    if config.sample_tokens > 0 and config.vocab_size < N_VOCAB:
        raise ConfigError(f"--vocab_size={config.vocab_size} is smaller than the GPT-2 tokenizer's {N_VOCAB} tokens, "
                          f"so the sample prompt cannot be encoded for this model: raise vocab_size to 50304 (the "
                          f"default), or turn samples off with --sample_tokens=0.")


# keys an optimizer does not read, and why; a value away from its default draws a warning
IGNORED_BY = {"muon": ("weight_decay", "beta1", "beta2"),
              "adamw": ("matrix_lr", "embedding_lr", "unembedding_lr", "muon_momentum")}
IGNORED_WHY = {"muon": "Muon uses no weight decay, and its AdamW part fixed betas (0.8, 0.95) (docs/muon.md)",
               "adamw": "those are Muon's settings; AdamW uses learning_rate, weight_decay, beta1 and beta2"}


def plan_warnings(config, train_tokens=None):
    """`warning:` lines about a config that runs but probably not as meant; train_tokens: the train split's size."""
    warnings = []
    if config.warmup_steps >= config.max_steps:
        peak = min(1.0, config.max_steps / config.warmup_steps)  # the lr of the last step, as a share of the peak
        warnings.append(
            f"warning: warmup_steps ({config.warmup_steps}) >= max_steps ({config.max_steps}): the learning rate is "
            f"still warming up at the last step ({100 * peak:.0f}% of learning_rate) and never decays; set "
            f"--warmup_steps={max(1, config.max_steps // 10)} (a tenth of max_steps) or lower.")
    defaults = TrainConfig()
    ignored = [f"{key}={getattr(config, key)}" for key in IGNORED_BY[config.optimizer]
               if getattr(config, key) != getattr(defaults, key)]
    if ignored:
        warnings.append(f"warning: --optimizer={config.optimizer} ignores {', '.join(ignored)} (set away from the "
                        f"default): {IGNORED_WHY[config.optimizer]}")
    planned = config.max_steps * config.total_batch_size
    if train_tokens and planned > train_tokens:
        passes = planned / train_tokens
        warnings.append(
            f"warning: this run plans {planned:,} tokens (max_steps * total_batch_size = {config.max_steps:,} * "
            f"{config.total_batch_size:,}) but the train split holds {train_tokens:,}: about "
            f"{passes:,.{1 if passes < 10 else 0}f} passes over the same text (repeated text is soon memorized, "
            f"and val loss rises); if that is not meant, lower --max_steps or prepare more text.")
    return warnings


def config_to_dict(config):
    return dataclasses.asdict(config)


def save_config(config, path):
    """Through a temporary file and a rename: a kill mid-write leaves the previous config.json whole."""
    text = json.dumps(config_to_dict(config), indent=2).encode()
    atomic_write(path, lambda f: f.write(text))
