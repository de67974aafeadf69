"""Export one of our checkpoints as a Hugging Face GPT2LMHeadModel folder (config.json + model.safetensors).

    python scripts/export_hf.py out/gpt2_124m/ckpt_019073.pt out/gpt2_124m_hf
    python scripts/export_hf.py out/gpt2_xl/ckpt_010000.dcp out/gpt2_xl_hf    # a sharded (fsdp) checkpoint
    # then: GPT2LMHeadModel.from_pretrained("out/gpt2_124m_hf"), lm-eval, vLLM, ...
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoint_files import model_weights, try_load  # noqa: E402
from hf_interop import export_hf  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a ckpt_STEP.pt / best_STEP.pt file or .dcp folder written by train.py")
    parser.add_argument("out_dir", help="folder to write config.json and model.safetensors into")
    args = parser.parse_args(argv)
    checkpoint, problem = try_load(args.checkpoint, required=("model", "config"))
    if checkpoint is None:
        print(f"error: cannot read checkpoint {args.checkpoint}: {problem}", file=sys.stderr)
        return 2
    try:
        export_hf(model_weights(args.checkpoint, checkpoint), checkpoint["config"], args.out_dir)
    except OSError as e:
        print(f"error: cannot write {args.out_dir}: {e.strerror}. Choose a folder you can write to.", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir}/config.json and model.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
