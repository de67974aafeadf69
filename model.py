"""GPT-2, exactly: pre-LayerNorm blocks, tanh GELU, learned positions, biases, lm_head tied to wte.

Parameter names and shapes map one-to-one onto Hugging Face's GPT2LMHeadModel (whose Conv1D weights
are the transpose of our nn.Linear weights). Torch only: no data, optimizer or distribution here.

GPTConfig's defaults are GPT-2; its other fields switch on the changes of the modern recipe one at a time
(nanochat, modded-nanogpt; docs/modern.md): rotary positions instead of wpe, RMS-normalised q and k,
relu(x)^2 MLPs, RMSNorm without parameters, zero-initialised output projections and soft-capped logits.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2_pretrain.fused_loss import linear_cross_entropy

GPT2_VOCAB_SIZE = 50257  # real tokens; ids from here up to vocab_size are padding
ROTARY_BASE = 10000.0  # rotary frequencies: theta_i = base ** (-2i / hs), i < hs/2


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # 50257 padded up to a multiple of 128 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    tie_embeddings: bool = True
    rotary: bool = False  # rotary position embeddings on q and k (no wpe)
    qk_norm: bool = False  # q and k RMS-normalised per head, without parameters
    mlp: str = "gelu"  # gelu (tanh approximation) | relu2: relu(x)^2
    norm: str = "layernorm"  # layernorm (gain and bias) | rmsnorm (no parameters)
    zero_init: bool = False  # the residual output projections (attn.c_proj, mlp.c_proj) start at zero
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap)


def norm_layer(config):
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=1e-6, elementwise_affine=False)
    return nn.LayerNorm(config.n_embd)


def rotary_cos_sin(T, head_size, device, base=ROTARY_BASE):
    """(T, hs/2) cos and sin of position t times frequency base ** (-2i / hs); computed in each forward (tiny),
    so the model holds no buffer: nothing to shard, checkpoint or build on the meta device."""
    inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32, device=device) / head_size)
    angles = torch.arange(T, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate each pair (x[i], x[i + hs/2]) of x (B, nh, T, hs) by its position's angle (Llama's half split)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.rotary, self.qk_norm = config.rotary, config.qk_norm
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.residual_scale_init = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.qk_norm:  # unit RMS rows: attention logits bounded by sqrt(hs), whatever the weights grow to
            q, k = F.rms_norm(q, (q.size(-1),), eps=1e-6), F.rms_norm(k, (k.size(-1),), eps=1e-6)
        if self.rotary:
            cos, sin = rotary_cos_sin(T, C // self.n_head, x.device)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.relu2 = config.mlp == "relu2"
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.residual_scale_init = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        h = F.relu(h).square() if self.relu2 else self.gelu(h)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = norm_layer(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm_layer(config)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=None if config.rotary else nn.Embedding(config.block_size, config.n_embd),  # rotary: no wpe
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=norm_layer(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_scale_init", False) and self.config.zero_init:
                std = 0.0  # each block starts as the identity; the projections grow from their first gradient
            elif getattr(module, "residual_scale_init", False):
                # each block adds two residual projections: keep the residual stream's variance in check
                std *= (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.transformer.wpe is not None:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None):
        """(logits, None) without targets; (None, mean cross-entropy over targets != -1) with them."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.transformer.wpe is not None:
            x = x + self.transformer.wpe(torch.arange(0, T, dtype=torch.long, device=idx.device))
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        cap = self.config.logit_softcap
        if targets is None:
            logits = self.lm_head(x)  # (B, T, vocab_size) for sampling and scoring
            return (cap * torch.tanh(logits / cap) if cap > 0 else logits), None
        # training and val loss: lm_head and cross-entropy a chunk of rows at a time, never all the logits
        return None, linear_cross_entropy(x, self.lm_head.weight, targets, softcap=cap)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Extend idx (B, T) by max_new_tokens sampled tokens; padded ids are never emitted."""
        real_vocab = min(GPT2_VOCAB_SIZE, self.config.vocab_size)
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]
            logits, _ = self(context)
            logits = logits[:, -1, :real_vocab].float()  # drop the padding columns
            if temperature <= 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, real_vocab)).values[:, [-1]]
                    logits[logits < kth] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, next_id), dim=1)
        return idx

