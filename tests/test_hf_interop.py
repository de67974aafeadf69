"""Export to and import from Hugging Face GPT-2 folders, checked against transformers itself."""

import json
import os

import pytest
import torch

import train
from data.tokenizer import encode, get_encoding
from gpt2_pretrain.hf_interop import export_hf, import_hf
from model import GPT, GPTConfig
from tests.conftest import FULL_VOCAB, read_metrics, run_python, tiny_args

transformers = pytest.importorskip("transformers")


def random_model(tie=True):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=32, tie_embeddings=tie))
    return model


def model_keys(model):
    c = model.config
    return {"n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "block_size": c.block_size,
            "vocab_size": c.vocab_size, "tie_embeddings": c.tie_embeddings}


@pytest.mark.parametrize("tie", [True, False])
def test_exported_model_matches_ours_in_transformers(tmp_path, tie):
    ours = random_model(tie).eval()
    export_hf(ours.state_dict(), model_keys(ours), str(tmp_path / "hf"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf.config.vocab_size == 50257 and hf.config.tie_word_embeddings == tie
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        ours_logits = ours(idx)[0][..., :50257]
        hf_logits = hf(idx).logits
    assert (ours_logits - hf_logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("tie", [True, False])
def test_export_import_round_trips_exactly(tmp_path, tie):
    ours = random_model(tie)
    export_hf(ours.state_dict(), model_keys(ours), str(tmp_path / "hf"))
    keys, state = import_hf(str(tmp_path / "hf"))
    assert keys == {k: v for k, v in model_keys(ours).items() if k != "vocab_size"}
    original = ours.state_dict()
    assert set(state) == set(original)
    for name in original:
        if name in ("transformer.wte.weight", "lm_head.weight"):
            assert torch.equal(state[name][:50257], original[name][:50257]), name
            assert torch.allclose(state[name][50257:], original[name][:50257].mean(0).expand(47, -1)), name
        else:
            assert torch.equal(state[name], original[name]), name
    export_hf(state, model_keys(ours), str(tmp_path / "again"))  # export -> import -> export is exact
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "hf" / "model.safetensors").read_bytes()


def test_import_from_a_transformers_save(tmp_path):
    config = transformers.GPT2Config(vocab_size=50257, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(1)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(str(tmp_path / "saved"))
    keys, state = import_hf(str(tmp_path / "saved"))
    ours = GPT(GPTConfig(vocab_size=50304, **{k: keys[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}))
    ours.load_state_dict(state)
    idx = torch.randint(0, 50257, (1, 32))
    with torch.no_grad():
        assert (ours.eval()(idx)[0][..., :50257] - hf(idx).logits).abs().max().item() < 1e-4


@pytest.mark.slow  # starts a Python process that imports torch: about 4 s each on the 2-core box
def test_train_init_from_a_folder_and_export_script(token_dir, tmp_path):
    ours = random_model()
    export_hf(ours.state_dict(), model_keys(ours), str(tmp_path / "hf"))
    val = {}
    for seed in (1, 2):
        out = str(tmp_path / f"seed{seed}")
        train.main(tiny_args(token_dir, out, FULL_VOCAB, f"--init_from={tmp_path / 'hf'}", f"--seed={seed}",
                             "--max_steps=2"))
        val[seed] = [m["val_loss"] for m in read_metrics(out) if "val_loss" in m][0]
    assert val[1] == val[2]  # the weights came from the folder, not from the seed
    result = run_python(["scripts/export_hf.py", f"{tmp_path}/seed1/ckpt_000002.pt", str(tmp_path / "again")])
    assert result.returncode == 0, result.stderr
    assert transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "again")).config.n_layer == 2


@pytest.mark.slow  # starts a Python process that imports torch: about 4 s each on the 2-core box
def test_init_from_another_shape_is_refused(token_dir, tmp_path):
    ours = random_model()
    export_hf(ours.state_dict(), model_keys(ours), str(tmp_path / "hf"))
    result = run_python(["train.py", *tiny_args(token_dir, str(tmp_path / "out"), FULL_VOCAB,
                                                f"--init_from={tmp_path / 'hf'}", "--n_layer=3")])
    assert result.returncode == 2
    assert "n_layer: 2 in the folder vs 3 requested" in result.stderr and "Traceback" not in result.stderr


TEXTS = ["Hello world", "To be, or not to be: that is the question.\n\n  Whether 'tis nobler in the mind",
         "don't they'll we've I'm she's you're", "  leading and trailing spaces   ", "tabs\tand\r\nCRLF\n\n\n",
         "def f(x):\n    return x ** 2  # square\n", "3.14159 1,000,000 2026-11-30 0x1F",
         "caf\u00e9 na\u00efve \u00fcber \u00c5ngstr\u00f6m", "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u4e2d\u6587",
         "emoji \U0001F600\U0001F680 and \u2014 dashes \u2026", "a <|endoftext|> b", ""]

HF_SIDE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompt, tokens, texts = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
ids = tokenizer(prompt, return_tensors="pt").input_ids
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                     pad_token_id=tokenizer.eos_token_id)
print(json.dumps({"encoded": [tokenizer.encode(text) for text in texts], "generated": tokenizer.decode(out[0]),
                  "decoded": [tokenizer.decode(tokenizer.encode(text)) for text in texts]}))
"""


@pytest.mark.slow  # starts a Python process that imports torch: about 4 s each on the 2-core box
def test_run_folder_export_loads_offline_and_generates_as_sample_does(token_dir, tmp_path, capsys):
    """export_hf.py on a run's out_dir: transformers loads model and tokenizer with the network off, encodes
    as tiktoken does, and greedy generation gives sample.py's greedy text."""
    from scripts import export_hf as export_script
    from scripts import sample

    run, hf = str(tmp_path / "run"), str(tmp_path / "hf")
    train.main(tiny_args(token_dir, run, FULL_VOCAB, "--max_steps=2"))
    umask = os.umask(0o022)
    try:
        assert export_script.main([run, hf]) == 0
    finally:
        os.umask(umask)
    assert {name: oct(os.stat(os.path.join(hf, name)).st_mode & 0o777) for name in os.listdir(hf)} == {
        name: "0o644" for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt",
                                   "tokenizer_config.json", "special_tokens_map.json")}
    prompt, tokens = "Hello!", 12
    # greedy choices are the same in both models only if each step's best logit leads the second by more than
    # the two models' logits differ (within 1e-4, tested above): this run's margins are checked to be 10x that
    model, ids = sample.load_model(run, "cpu"), torch.tensor([encode(prompt)])
    with torch.no_grad():
        for _ in range(tokens):
            top = torch.topk(model(ids)[0][0, -1, :50257], 2)
            assert (top.values[0] - top.values[1]).item() > 1e-3
            ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
    capsys.readouterr()
    assert sample.main([run, f"--prompt={prompt}", f"--tokens={tokens}", "--temperature=0"]) == 0
    sampled = capsys.readouterr().out
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = run_python(["-c", HF_SIDE, hf, prompt, str(tokens), json.dumps(TEXTS)], env=offline)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.splitlines()[-1])
    # transformers reads a literal <|endoftext|> as the special token, as tiktoken does when it is allowed
    assert answer["encoded"] == [get_encoding().encode(text, allowed_special="all") for text in TEXTS]
    assert answer["decoded"] == TEXTS
    assert sampled.split("\n" + "-" * 40)[0] == answer["generated"] == get_encoding().decode(ids[0].tolist())
