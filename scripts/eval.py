"""HellaSwag acc, acc_norm (lm-eval's, per character) and acc_per_token (build-nanogpt's acc_norm) of a
checkpoint or a local GPT-2 folder.

    python scripts/eval.py out/gpt2_124m/ckpt_019073.pt
    python scripts/eval.py out/gpt2_xl/ckpt_010000.dcp                   # a sharded (fsdp) checkpoint
    python scripts/eval.py path/to/gpt2_folder --hellaswag_path data/hellaswag/hellaswag_val.jsonl --limit 1000
    torchrun --standalone --nproc_per_node=8 scripts/eval.py out/gpt2_124m/ckpt_019073.pt
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from safetensors import SafetensorError  # noqa: E402

from config import ConfigError  # noqa: E402
from data.tokenizer import encode  # noqa: E402
from gpt2_pretrain.checkpoint.files import list_checkpoints, model_weights  # noqa: E402
from gpt2_pretrain.distributed import setup_distributed, teardown_distributed  # noqa: E402
from gpt2_pretrain.hellaswag import HELLASWAG_URL, HellaSwagError, evaluate_hellaswag, load_hellaswag  # noqa: E402
from gpt2_pretrain.hf_interop import import_hf  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from scripts.sample import find_checkpoint  # noqa: E402
from train import autocast_context  # noqa: E402


def load_model(path):
    """A GPT from one of our checkpoints (a file, a .dcp folder, or a run's out_dir: its newest usable one) or
    from a GPT-2 folder (config.json + model.safetensors)."""
    # an out_dir holds a config.json too, beside its checkpoints
    gpt2_folder = os.path.isfile(os.path.join(path, "config.json")) and not list_checkpoints(path)
    if gpt2_folder or os.path.isfile(os.path.join(path, "model.safetensors")):
        try:
            keys, state = import_hf(path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as e:
            raise ConfigError(f"{path} is not a GPT-2 folder that can be read ({type(e).__name__}: {e}): give a "
                              f"folder written by scripts/export_hf.py or transformers, or a checkpoint.") from None
    else:
        path, checkpoint = find_checkpoint(path, required=("model", "config"))
        keys, state = checkpoint["config"], model_weights(path, checkpoint)
    fields = GPTConfig.__dataclass_fields__
    config = GPTConfig(**{k: v for k, v in keys.items() if k in fields})
    if "vocab_size" not in keys:
        config.vocab_size = state["transformer.wte.weight"].size(0)
    model = GPT(config)
    model.load_state_dict(state)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a checkpoint file or .dcp folder written by train.py, a run's out_dir (its "
                                      "newest usable checkpoint), or a GPT-2 folder")
    parser.add_argument("--hellaswag_path", default="data/hellaswag/hellaswag_val.jsonl")
    parser.add_argument("--hellaswag_url", default=HELLASWAG_URL, help="where to download it from when missing")
    parser.add_argument("--limit", type=int, default=0, help="only the first N examples (0: all)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if not os.path.exists(args.model):
        print(f"error: {args.model} does not exist", file=sys.stderr)
        return 2
    try:
        info = setup_distributed(args.device)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        model = load_model(args.model).to(info.device)  # a wrong file is refused before any download
        examples = load_hellaswag(args.hellaswag_path, args.hellaswag_url)
        examples = examples[: args.limit] if args.limit else examples
        scores = evaluate_hellaswag(model, examples, encode, model.config.block_size, info.device, info.rank,
                                    info.world_size, lambda: autocast_context(info.device_type))
    except (ConfigError, HellaSwagError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        teardown_distributed()
    if info.is_master:
        print(f"hellaswag: acc {scores['hellaswag_acc']:.4f} | acc_norm {scores['hellaswag_acc_norm']:.4f} | "
              f"acc_per_token {scores['hellaswag_acc_per_token']:.4f} | "
              f"examples {scores['hellaswag_examples']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
