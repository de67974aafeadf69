"""Convert between our checkpoints and Hugging Face GPT2LMHeadModel folders (config.json + model.safetensors),
and write GPT-2's tokenizer files beside them.

Our nn.Linear weights are the transpose of HF's Conv1D weights; everything else maps one-to-one. The
export drops the padded vocab rows (50257..vocab_size-1); the import adds them back as the mean of the
real rows: a zero row would give padded ids logit 0, far above a trained GPT-2's typical logits, and
they would take most of the softmax; the mean row gives them about the mean logit. Export -> import ->
export is exact.
The tokenizer files (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json) are built from
the bundled tiktoken rank file, so AutoTokenizer.from_pretrained(folder) needs no network.
Needs safetensors only: transformers is not required to write or read these folders.
"""

import json
import os

import torch
from safetensors.torch import load_file, save_file

from config import ARCHITECTURE_KEYS, ARCHITECTURES, ConfigError
from data.tokenizer import EOT_TOKEN, hf_vocab_and_merges
from gpt2_pretrain.atomic import atomic_path, atomic_write
from model import GPT2_VOCAB_SIZE

TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", *ARCHITECTURE_KEYS)
# the modern switches (config.ARCHITECTURES) transformers' GPT2LMHeadModel has no place for; an untied head it has
GPT2_CANNOT_HOLD = {"rotary": "rotary positions", "qk_norm": "QK-norm", "mlp": "a relu2 MLP",
                    "norm": "RMSNorm without parameters", "logit_softcap": "logit soft-capping"}


def features_gpt2_cannot_hold(model_config):
    """What of a checkpoint's model keys transformers' GPT-2 cannot hold, as 'rotary positions (rotary=True)'.
    zero_init is only how the weights started: a trained model with it is still GPT-2 shaped."""
    gpt2 = ARCHITECTURES["gpt2"]
    return [f"{name} ({key}={model_config[key]!r})" for key, name in GPT2_CANNOT_HOLD.items()
            if model_config.get(key, gpt2[key]) != gpt2[key]]


def hf_config(model_config):
    """A transformers GPT2Config as a dict, from our model keys (n_layer, n_head, n_embd, block_size, ...)."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": GPT2_VOCAB_SIZE,
        "n_positions": model_config["block_size"], "n_ctx": model_config["block_size"],
        "n_embd": model_config["n_embd"], "n_layer": model_config["n_layer"], "n_head": model_config["n_head"],
        "n_inner": None, "activation_function": "gelu_new", "resid_pdrop": 0.0, "embd_pdrop": 0.0,
        "attn_pdrop": 0.0, "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "bos_token_id": 50256, "eos_token_id": 50256,
        "tie_word_embeddings": bool(model_config.get("tie_embeddings", True)), "torch_dtype": "float32",
    }


def to_hf_state_dict(state_dict, tie_embeddings=True):
    out = {}
    for name, tensor in state_dict.items():
        if name == "lm_head.weight" and tie_embeddings:
            continue  # HF ties lm_head to wte when it loads
        if name.endswith(TRANSPOSED):
            tensor = tensor.t()
        if name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[:GPT2_VOCAB_SIZE]
        out[name] = tensor.detach().to("cpu", torch.float32).contiguous()
    return out


def export_hf(state_dict, model_config, out_dir):
    """Write a GPT2LMHeadModel folder from our model weights and model keys."""
    os.makedirs(out_dir, exist_ok=True)
    tie = bool(model_config.get("tie_embeddings", True))
    path = os.path.join(out_dir, "model.safetensors")
    with atomic_path(path) as tmp:
        save_file(to_hf_state_dict(state_dict, tie), tmp, metadata={"format": "pt"})
        # safetensors creates its file mode 0600 (through a temporary file of its own): give it the mode any
        # new file gets under the umask, as the other files here have
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    write_json(os.path.join(out_dir, "config.json"), hf_config(model_config))


def write_json(path, data):
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, ensure_ascii=False).encode()))


def export_tokenizer(out_dir, model_max_length):
    """Write GPT-2's tokenizer files (as transformers' GPT2Tokenizer reads them) into out_dir."""
    vocab, merges = hf_vocab_and_merges()
    write_json(os.path.join(out_dir, "vocab.json"), vocab)
    text = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges)
    atomic_write(os.path.join(out_dir, "merges.txt"), lambda f: f.write(text.encode()))
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    write_json(os.path.join(out_dir, "special_tokens_map.json"), special)
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length, "add_prefix_space": False,
        "add_bos_token": False, "clean_up_tokenization_spaces": False, "errors": "replace", **special,
        "added_tokens_decoder": {str(EOT_TOKEN): {"content": "<|endoftext|>", "special": True, "lstrip": False,
                                                  "rstrip": False, "normalized": True, "single_word": False}},
    })


def import_hf(folder, vocab_size=50304):
    """(model keys, state dict for our GPT) from a local GPT-2 folder (config.json + model.safetensors)."""
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"its config.json holds a {type(config).__name__}, not a JSON object")
    weights = load_file(os.path.join(folder, "model.safetensors"))
    tie = bool(config.get("tie_word_embeddings", True))
    model_keys = {"n_layer": config["n_layer"], "n_head": config["n_head"], "n_embd": config["n_embd"],
                  "block_size": config["n_positions"], "tie_embeddings": tie}
    state = {}
    for name, tensor in weights.items():
        name = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"  # bare GPT2Model
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of older transformers versions
        if name.endswith(TRANSPOSED):
            tensor = tensor.t()
        if name in ("transformer.wte.weight", "lm_head.weight"):
            if tensor.size(0) > vocab_size:
                raise ConfigError(f"init_from '{folder}' has a vocabulary of {tensor.size(0)} tokens, more than "
                                  f"--vocab_size={vocab_size}: raise vocab_size to at least {tensor.size(0)} (50304 "
                                  f"for GPT-2).")
            padded = tensor.mean(dim=0, keepdim=True).repeat(vocab_size, 1)
            padded[: tensor.size(0)] = tensor
            tensor = padded
        state[name] = tensor.contiguous()
    if tie or "lm_head.weight" not in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return model_keys, state


def mismatched_keys(model_keys, config):
    """Keys where a GPT-2 folder and the requested config disagree, as 'key: folder vs config'; the folder
    holds GPT-2 (config.ARCHITECTURES) in the switches it has no key for."""
    model_keys = {**ARCHITECTURES["gpt2"], **model_keys}
    return [f"{k}: {model_keys[k]!r} in the folder vs {getattr(config, k)!r} requested" for k in HF_SHAPE_KEYS
            if model_keys[k] != getattr(config, k)]
