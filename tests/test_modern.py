"""--architecture=modern and its switches against hand-written formulas; the wsd schedule; refusals; modern
training resumed exactly, and under ddp and fsdp at 2 processes."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import model as model_module
import train
from config import ARCHITECTURES, load_config
from configure_optimizers import get_lr, muon_param_groups
from gpt2_pretrain.flops import model_flops_per_token
from gpt2_pretrain.fused_loss import linear_cross_entropy
from model import GPT, GPTConfig, apply_rotary, rotary_cos_sin
from scripts import export_hf
from tests.conftest import read_metrics, tiny_args, torchrun

MODERN = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16, **ARCHITECTURES["modern"])


def modern(**switches):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**MODERN.__dict__, **switches}))


def test_architecture_sets_the_switches_a_flag_does_not():
    assert {k: getattr(load_config([]), k) for k in ARCHITECTURES["gpt2"]} == ARCHITECTURES["gpt2"]
    config = load_config(["--architecture=modern", "--qk_norm=false", "--sample_tokens=0"])
    assert {k: getattr(config, k) for k in ARCHITECTURES["modern"]} == {**ARCHITECTURES["modern"], "qk_norm": False}
    gpt2 = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    names = set(modern().state_dict())
    assert "transformer.wpe.weight" in gpt2.state_dict() and "transformer.wpe.weight" not in names  # rotary
    assert "lm_head.weight" in names and not any(".ln_" in n for n in names)  # untied; rmsnorm has no parameters


def test_rotary_matches_its_definition_and_depends_on_relative_positions_only():
    T, hs, base = 5, 6, model_module.ROTARY_BASE
    x = torch.randn(1, 1, T, hs, dtype=torch.float64)
    cos, sin = rotary_cos_sin(T, hs, "cpu")
    rotated = apply_rotary(x, cos.double(), sin.double())
    expected = torch.empty_like(x)
    for t in range(T):
        for i in range(hs // 2):  # the pair (i, i + hs/2) turned by the angle t * base ** (-2i / hs)
            angle = t * base ** (-2 * i / hs)
            a, b = x[0, 0, t, i].item(), x[0, 0, t, i + hs // 2].item()
            expected[0, 0, t, i] = a * math.cos(angle) - b * math.sin(angle)
            expected[0, 0, t, i + hs // 2] = a * math.sin(angle) + b * math.cos(angle)
    torch.testing.assert_close(rotated, expected, atol=1e-6, rtol=0)  # the model's angles are float32; values ~1
    # q at position t and k at s score as q at t+d and k at s+d: the same vector at every position
    q, k = torch.randn(hs).repeat(1, 1, T, 1), torch.randn(hs).repeat(1, 1, T, 1)
    scores = apply_rotary(q, cos, sin)[0, 0] @ apply_rotary(k, cos, sin)[0, 0].T
    torch.testing.assert_close(scores[3, 1], scores[4, 2])  # float32 rounding of the angles: default tolerance
    torch.testing.assert_close(scores[2, 0], scores[4, 2])


def test_qk_norm_gives_unit_rms_rows(monkeypatch):
    seen, attention = [], F.scaled_dot_product_attention

    def recording_attention(q, k, v, **kwargs):
        seen.append((q, k))
        return attention(q, k, v, **kwargs)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", recording_attention)
    model = modern()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(30)  # rows of RMS ~2 before the norm, whatever their scale would be
        model(torch.randint(0, 64, (2, 16)))
    assert len(seen) == 2
    for q, k in seen:
        for rows in (q, k):  # (B, nh, T, hs); rotary turns pairs, which keeps each row's norm
            # 1e-5: rms_norm's eps (1e-6) against rows of mean square ~4 (1e-7 relative), and float32 rounding
            torch.testing.assert_close(rows.pow(2).mean(-1).sqrt(), torch.ones(rows.shape[:-1]), atol=1e-5, rtol=0)


def test_relu2_mlp_and_parameter_free_rmsnorm_match_their_formulas():
    block = modern(zero_init=False).transformer.h[0]
    x = torch.randn(3, 16)
    mlp = block.mlp
    expected = F.relu(x @ mlp.c_fc.weight.T + mlp.c_fc.bias).pow(2) @ mlp.c_proj.weight.T + mlp.c_proj.bias
    torch.testing.assert_close(mlp(x), expected)  # float32, the same ops in another order: default tolerance
    assert list(block.ln_1.parameters()) == []
    torch.testing.assert_close(block.ln_1(x), x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt())


def test_zero_init_blocks_start_as_identity_and_softcap_bounds_the_logits():
    model = modern()
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().max() == 0 and block.mlp.c_proj.weight.abs().max() == 0
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)  # raw logits far beyond the cap
        logits, _ = model(idx)
        x = model.transformer.wte(idx)  # every block adds zero: the residual stream is the token embedding
        raw = (x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()) @ model.lm_head.weight.T
    cap = MODERN.logit_softcap
    assert raw.abs().max() > 10 * cap and logits.abs().max() <= cap  # float32 tanh reaches 1.0 exactly
    torch.testing.assert_close(logits, cap * torch.tanh(raw / cap))  # same float32 ops: default tolerance


def test_softcapped_chunked_loss_matches_cross_entropy_of_capped_logits(monkeypatch):
    from gpt2_pretrain import fused_loss

    monkeypatch.setattr(fused_loss, "CPU_CHUNK_ELEMENTS", 2**10)  # several chunks
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=generator, requires_grad=True)
    weight = (3 * torch.randn(100, 8, generator=generator)).requires_grad_()  # logits of tens: the cap bites
    targets = torch.randint(0, 100, (50,), generator=generator)
    targets[::7] = -1
    cap = 15.0
    expected = F.cross_entropy(cap * torch.tanh((x @ weight.T) / cap), targets, ignore_index=-1)
    expected_grads = torch.autograd.grad(expected, (x, weight))
    loss = linear_cross_entropy(x, weight, targets, softcap=cap)
    grads = torch.autograd.grad(loss, (x, weight))
    # float32, summed in another order (chunks): test_fused_loss.py's tolerances
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # evaluation's branch
        torch.testing.assert_close(linear_cross_entropy(x, weight, targets, softcap=cap), expected, rtol=1e-5,
                                   atol=1e-6)


def test_wsd_schedule_matches_its_formula():
    lr, min_lr, warmup, steps, frac = 1.0, 0.1, 10, 100, 0.3
    for step in range(0, 110):
        if step < warmup:
            expected = lr * (step + 1) / warmup
        elif step < 70:  # stable until the last 30 steps
            expected = lr
        elif step < steps:
            expected = min_lr + (lr - min_lr) * (steps - step) / 30
        else:
            expected = min_lr
        assert get_lr(step, lr, min_lr, warmup, steps, "wsd", frac) == pytest.approx(expected, rel=1e-12)
    # cosine stays what it was
    assert get_lr(55, lr, min_lr, warmup, steps) == pytest.approx(min_lr + 0.5 * (lr - min_lr), rel=1e-12)  # halfway


def test_flops_muon_groups_and_sampling_of_the_modern_model():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = modern()
    idx = torch.randint(0, 64, (2, 16))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        logits, _ = model(idx)
        F.cross_entropy(logits.view(-1, 64), idx.view(-1)).backward()
    # exact: both count the matmuls and attention only (rotary, norms, relu2 and the cap are elementwise)
    assert model_flops_per_token(model) == counter.get_total_flops() / idx.numel()
    groups = {kind: [name for name, _ in params] for kind, params in muon_param_groups(model).items()}
    assert groups["unembedding"] == ["lm_head.weight"] and groups["embedding"] == ["transformer.wte.weight"]
    assert len(groups["matrix"]) == 4 * MODERN.n_layer
    out = model.eval().generate(torch.zeros((1, 1), dtype=torch.long), 20, top_k=5)  # past block_size: cropped
    assert out.shape == (1, 21)


def test_modern_resumes_exactly_and_a_gpt2_checkpoint_is_refused_in_one_line(token_dir, tmp_path, capsys):
    args = ["--architecture=modern", "--optimizer=muon", "--lr_schedule=wsd", "--max_steps=6",
            "--checkpoint_interval=3", "--keep_best=false"]
    reference, resumed = str(tmp_path / "reference"), str(tmp_path / "resumed")
    train.main(tiny_args(token_dir, reference, *args))
    train.main(tiny_args(token_dir, resumed, *args))
    os.remove(os.path.join(resumed, "ckpt_000006.pt"))  # the run resumes from step 3 and does 3, 4, 5 again
    train.main(tiny_args(token_dir, resumed, *args))
    assert "ckpt_000003.pt at step 3" in capsys.readouterr().out
    final = [torch.load(os.path.join(d, "ckpt_000006.pt"), weights_only=True) for d in (reference, resumed)]
    for name, tensor in final[0]["model"].items():
        assert torch.equal(final[1]["model"][name], tensor), name
    assert [m.get("loss") for m in read_metrics(reference)] == [m.get("loss") for m in read_metrics(resumed)]

    gpt2 = str(tmp_path / "gpt2")
    train.main(tiny_args(token_dir, gpt2, "--max_steps=1"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(token_dir, gpt2, "--max_steps=2", "--architecture=modern"))
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(error.splitlines()) == 1, error
    assert error.startswith("error: the checkpoint holds a --architecture=gpt2 model") and "rotary: False" in error

    assert export_hf.main([reference, str(tmp_path / "hf")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "rotary positions (rotary=True)" in error, error
    assert not os.path.exists(tmp_path / "hf")


@pytest.mark.slow  # one torchrun launch: both runs in the same 2 processes (tests/commands_worker.py)
def test_modern_trains_alike_under_ddp_and_fsdp(token_dir, tmp_path):
    common = ["--architecture=modern", "--optimizer=muon", "--lr_schedule=wsd", "--max_steps=8",
              "--eval_interval=8", "--batch_size=2", "--log_interval=1"]
    commands = [tiny_args(token_dir, str(tmp_path / parallel), *common, f"--parallel={parallel}")
                for parallel in ("ddp", "fsdp")]
    listing = tmp_path / "commands.json"
    listing.write_text(json.dumps(commands))
    result = torchrun(2, "tests/commands_worker.py", [str(listing)])
    assert result.returncode == 0, result.stderr[-3000:]
    ddp, fsdp = ([m["loss"] for m in read_metrics(tmp_path / p) if "loss" in m] for p in ("ddp", "fsdp"))
    assert len(ddp) == len(fsdp) == 8 and ddp[-1] < ddp[0] - 0.5  # learns the counting pattern
    # float32 reduction order only (all-reduce against reduce-scatter); muon's AdamW half (eps 1e-10) turns
    # float32 noise into steps: tests/test_parallel.py's muon tolerance
    for a, b in zip(ddp, fsdp):
        assert math.isclose(a, b, rel_tol=2e-3), (ddp, fsdp)
