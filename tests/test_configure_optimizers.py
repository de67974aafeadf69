import math

import pytest
import torch

from configure_optimizers import configure_adamw, get_lr, param_groups
from model import GPT, GPTConfig


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=128, n_layer=2, n_head=2, n_embd=16))


def test_each_parameter_in_exactly_one_group_and_2d_decayed():
    model = tiny_model()
    groups = param_groups(model, 0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")) for p in groups[1]["params"])


def test_adamw_settings_and_fused_on_cpu():
    messages = []
    optimizer = configure_adamw(tiny_model(), 0.1, 6e-4, device_type="cpu", log=messages.append)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-8
    assert optimizer.defaults["fused"] is True
    assert "decayed" in messages[0]


def test_fused_adamw_matches_torch_reference():
    """Our optimizer takes the same step as a plain, unfused torch AdamW with the same groups."""
    model_a, model_b = tiny_model(), tiny_model()
    ours = configure_adamw(model_a, 0.1, 1e-2, device_type="cpu", log=lambda *a: None)
    reference = torch.optim.AdamW(param_groups(model_b, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    idx = torch.randint(0, 128, (2, 16))
    for model, optimizer in ((model_a, ours), (model_b, reference)):
        for _ in range(3):
            _, loss = model(idx, idx)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # fused vs foreach rounding (a near-zero grad can flip)


@pytest.mark.parametrize("step, expected", [
    (0, 6e-4 / 715),  # not zero at step 0
    (714, 6e-4),  # end of warmup reaches the peak
    (715 + (19073 - 715) // 2, 6e-5 + 0.5 * (6e-4 - 6e-5)),  # midway through the cosine
    (19073, 6e-5),  # max_steps
    (30000, 6e-5),  # after max_steps
])
def test_schedule(step, expected):
    assert math.isclose(get_lr(step, 6e-4, 6e-5, 715, 19073), expected, rel_tol=1e-3)
