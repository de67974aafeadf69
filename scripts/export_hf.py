"""Export a run (its newest usable checkpoint) or one checkpoint as a Hugging Face GPT-2 folder: config.json,
model.safetensors and GPT-2's tokenizer files, loadable offline.

    python scripts/export_hf.py out/gpt2_124m out/gpt2_124m_hf                # a run's out_dir: its newest checkpoint
    python scripts/export_hf.py out/gpt2_124m/best_019000.pt out/gpt2_124m_hf  # one checkpoint file
    python scripts/export_hf.py out/gpt2_xl/ckpt_010000.dcp out/gpt2_xl_hf    # a sharded (fsdp) checkpoint
    # then: AutoModelForCausalLM.from_pretrained(OUT) and AutoTokenizer.from_pretrained(OUT), lm-eval, vLLM, ...
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import ConfigError  # noqa: E402
from gpt2_pretrain.checkpoint.files import model_weights  # noqa: E402
from gpt2_pretrain.hf_interop import export_hf, export_tokenizer, features_gpt2_cannot_hold  # noqa: E402
from scripts.sample import find_checkpoint  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a run's out_dir (its newest usable checkpoint), or a ckpt_STEP.pt / "
                                           "best_STEP.pt file or .dcp folder written by train.py")
    parser.add_argument("out_dir", help="folder to write the model and tokenizer files into")
    args = parser.parse_args(argv)
    try:
        path, checkpoint = find_checkpoint(args.checkpoint, required=("model", "config"))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cannot := features_gpt2_cannot_hold(checkpoint["config"]):
        print(f"error: {path} is a --architecture={checkpoint['config'].get('architecture', 'gpt2')} model with "
              f"{', '.join(cannot)}, which transformers' GPT-2 cannot hold: only a GPT-2 model (learned positions, "
              f"GELU, LayerNorm, no soft-cap; tied or untied head) exports; use scripts/sample.py and "
              f"scripts/eval.py on the checkpoint itself.", file=sys.stderr)
        return 2
    try:
        export_hf(model_weights(path, checkpoint), checkpoint["config"], args.out_dir)
        export_tokenizer(args.out_dir, checkpoint["config"]["block_size"])
    except OSError as e:
        print(f"error: cannot write {args.out_dir}: {e.strerror}. Choose a folder you can write to.", file=sys.stderr)
        return 2
    print(f"exported {path} to {args.out_dir}: config.json, model.safetensors and the GPT-2 tokenizer files\n"
          f"load it with transformers' AutoModelForCausalLM.from_pretrained({args.out_dir!r}) and "
          f"AutoTokenizer.from_pretrained({args.out_dir!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
