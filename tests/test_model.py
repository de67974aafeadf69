import math

import pytest
import torch

from model import GPT, GPTConfig

TINY = GPTConfig(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)


def test_later_tokens_never_change_earlier_logits():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    idx = torch.randint(0, 50257, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = torch.randint(0, 50257, (2, 6))
    logits_a, _ = model(idx)
    logits_b, _ = model(changed)
    torch.testing.assert_close(logits_a[:, :10], logits_b[:, :10])
    assert not torch.allclose(logits_a[:, 10:], logits_b[:, 10:])


def test_init_loss_is_near_uniform():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=128))
    idx = torch.randint(0, 50257, (4, 64))
    targets = torch.randint(0, 50257, (4, 64))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(50257)) < 0.1


def test_init_std_and_tying():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=64))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 1e-3
    residual_std = 0.02 / math.sqrt(2 * 12)
    assert abs(model.transformer.h[0].attn.c_proj.weight.std().item() - residual_std) < 1e-3
    assert model.transformer.h[0].attn.c_attn.bias.abs().max().item() == 0
    assert model.num_params() == 124_475_904 - 768 * (1024 - 64)  # GPT-2 124M with a shorter wpe


def test_generate_never_emits_padded_ids():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    with torch.no_grad():
        # make the padded ids by far the most likely: ln_f outputs ones, padded rows of wte point along them
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight.zero_()
        model.transformer.wte.weight[50257:] = 10.0
    out = model.generate(torch.zeros((2, 1), dtype=torch.long), 20, temperature=1.0, top_k=None)
    assert out.shape == (2, 21)
    assert out.max().item() < 50257


def test_logits_match_transformers_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, vocab_size=50304, n_layer=2, n_head=4, n_embd=64)
    ours = GPT(config).eval()
    hf_config = transformers.GPT2Config(vocab_size=50304, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                        activation_function="gelu_new")
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    hf_state = hf.state_dict()
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    ours_state = ours.state_dict()
    for name, tensor in ours_state.items():
        assert name in hf_state, name  # names map one-to-one
        value = tensor.t() if name.endswith(transposed) else tensor
        assert hf_state[name].shape == value.shape, name
        hf_state[name] = value
    hf.load_state_dict(hf_state)
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        ours_logits, _ = ours(idx)
        hf_logits = hf(idx).logits
    assert (ours_logits - hf_logits).abs().max().item() < 1e-4
