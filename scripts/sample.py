"""Generate text from any training checkpoint.

    python scripts/sample.py out/shakespeare                      # the newest valid checkpoint in a run's out_dir
    python scripts/sample.py out/shakespeare/best_000300.pt --prompt="ROMEO:" --tokens=100 --temperature=0.8 --top_k=50
    python scripts/sample.py out/shakespeare --prompt="ROMEO:" --temperature=0     # greedy: the likeliest token each time
"""

import argparse
import dataclasses
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import ConfigError  # noqa: E402
from data.tokenizer import EOT_TOKEN, decode, encode  # noqa: E402
from gpt2_pretrain.checkpoint.files import REQUIRED_KEYS, latest_valid, model_weights, try_load  # noqa: E402
from gpt2_pretrain.errors import check_device, fail  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint file, or an out_dir (its newest valid checkpoint)")
    parser.add_argument("--prompt", default="", help="text to continue (empty: start from <|endoftext|>)")
    parser.add_argument("--tokens", type=int, default=100, help="tokens to generate per sample")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (0: greedy)")
    parser.add_argument("--top_k", type=int, default=50, help="sample among the k likeliest tokens (0: all)")
    parser.add_argument("--num_samples", type=int, default=1, help="independent samples to print")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the sampling generator")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps")
    return parser.parse_args(argv)


def find_checkpoint(path, required=REQUIRED_KEYS):
    """(path, checkpoint) of a checkpoint file or .dcp folder, or of a run's out_dir's newest usable checkpoint
    (each broken one skipped is a warning); a ConfigError says why there is none."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, ".metadata")) and \
            not path.rstrip(os.sep).endswith(".dcp"):
        found, checkpoint = latest_valid(path, warn=lambda message: print(message, file=sys.stderr))
        if found is None:
            raise ConfigError(f"no usable checkpoint (ckpt_STEP.pt / best_STEP.pt) in {path}")
        return found, checkpoint
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such checkpoint file or out_dir")
    checkpoint, problem = try_load(path, required)
    if checkpoint is None:
        raise ConfigError(f"checkpoint {path} is unusable ({problem})")
    return path, checkpoint


def load_model(path, device):
    """The GPT stored in a checkpoint file (or an out_dir's newest valid one), in eval mode on `device`."""
    try:
        path, checkpoint = find_checkpoint(path)
    except ConfigError as e:
        fail(e)
    names = {f.name for f in dataclasses.fields(GPTConfig)}
    model = GPT(GPTConfig(**{k: v for k, v in checkpoint["config"].items() if k in names}))
    model.load_state_dict(model_weights(path, checkpoint))
    print(f"loaded {path} (step {checkpoint['step']}, {model.num_params():,} parameters)", file=sys.stderr)
    return model.to(device).eval()


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    bad = [f"--{name}={value}" for name, value, fine in (
        ("top_k", args.top_k, args.top_k >= 0), ("num_samples", args.num_samples, args.num_samples >= 1),
        ("tokens", args.tokens, args.tokens >= 0), ("temperature", args.temperature, 0 <= args.temperature < math.inf))
        if not fine]
    if bad:
        fail(f"{', '.join(bad)} is out of range: --top_k >= 0 (0: all tokens), --num_samples >= 1, --tokens >= 0 "
             f"and --temperature a finite number >= 0 (0: greedy).")
    try:
        args.device = check_device(args.device)
    except ConfigError as e:
        fail(e)
    model = load_model(args.checkpoint, args.device)
    vocab_size = model.config.vocab_size
    ids = encode(args.prompt) if args.prompt else [EOT_TOKEN if EOT_TOKEN < vocab_size else 0]
    if max(ids) >= vocab_size:
        fail(f"the prompt has token ids up to {max(ids)}, beyond this model's vocab_size {vocab_size}")
    prompt = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    out = model.generate(prompt, args.tokens, temperature=args.temperature, top_k=args.top_k or None,
                         generator=generator)
    for row in out.tolist():
        print(decode(row))
        print("-" * 40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
