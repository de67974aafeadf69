"""The language-model loss without the full logits: lm_head + cross-entropy, a chunk of rows at a time.

Plain `F.cross_entropy(lm_head(x).float(), targets)` holds the (B*T, V) logits, their float32 copy and
the softmax gradient at once: about 5 GB for GPT-2 124M at batch 8 x 1024, 13 GB per float32 copy at
batch 64. Here each chunk of rows gets its logits, its loss and the gradient of both inputs (x and the
lm_head weight) in the forward pass, and the chunk's logits are freed before the next one; backward only
scales the stored gradients. Under no_grad (evaluation) only the loss is computed. Same arithmetic as the
plain loss: logits in the autocast dtype (bf16 on GPUs), softmax in float32, the softmax over every column
of the padded vocabulary, -1 targets ignored. softcap > 0 caps the logits first: z -> softcap * tanh(z / softcap).

The chunk loop is one custom op (gpt2_pretrain::linear_cross_entropy), opaque to torch.compile: a compiled
model calls it as one node, so the lm_head weight's gradient stays one float32 accumulator between forward
and backward (traced, the loop kept a partial gradient per chunk alive). The per-chunk softmax is compiled
on its own on CUDA and inside a compiled model: one kernel per chunk, no float32 (rows, V) buffer (with
softcap, inductor keeps float32 matrices of the capped logits).
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

# float32 logits kept per chunk: 2**28 elements is 1 GiB (5,300 rows of GPT-2's 50304 columns) on a GPU;
# 2**26 (1,024 rows, 256 MiB) on a CPU, where chunks of fewer rows make the lm_head matmuls slower
GPU_CHUNK_ELEMENTS = 2**28
CPU_CHUNK_ELEMENTS = 2**26


def cap_logits(z, softcap):
    """softcap * tanh(z / softcap), in place in z (a chunk's own float32 logits): one (rows, V) matrix, not three,
    about half the time on a CPU, where tanh over the padded vocabulary costs twice the cross-entropy."""
    return z.div_(softcap).tanh_().mul_(softcap)


def _chunk_loss_and_grad(logits, targets, softcap):
    """Summed loss of the valid rows and d(summed loss)/d(logits), in the logits' dtype.

    Rows of ignored targets (-1) get a gradient too; the caller zeroes them on the narrow side (x's
    rows), which is cheaper than masking all V columns here."""
    z = logits.float()  # the softmax in float32 whatever the matmul dtype
    if softcap > 0:
        z = cap_logits(z, softcap)
    logp = torch.log_softmax(z, dim=-1)
    valid = targets != -1
    safe_targets = torch.where(valid, targets, 0)[:, None]
    loss_sum = torch.where(valid, -logp.gather(1, safe_targets).squeeze(1), 0.0).sum()
    if torch.compiler.is_compiling() and logits.dtype != torch.float32:
        # softmax - one-hot as one elementwise expression: inductor writes it in the logits' dtype in the
        # kernel that reads the logits, no float32 (rows, V) matrix in between
        probs = logp.exp()
        one_hot = torch.arange(z.size(1), device=z.device) == safe_targets
        grad = torch.where(one_hot, probs - 1, probs)
    else:  # in place: the float32 matrix is the gradient itself (the faster of the two on float32 logits)
        grad = logp.exp_()
        grad.scatter_add_(1, safe_targets, torch.full_like(safe_targets, -1.0, dtype=grad.dtype))
    if softcap > 0:
        grad = grad * (1 - (z / softcap) ** 2)  # d(capped)/dz = 1 - tanh(z / softcap)**2
    return loss_sum, grad.to(logits.dtype)


_compiled_chunk = None


def chunk_loss_and_grad(logits, targets, softcap, compiled):
    """Compiled: one fused kernel per chunk instead of several passes over the logits."""
    global _compiled_chunk
    if not compiled:
        return _chunk_loss_and_grad(logits, targets, softcap)
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk_loss_and_grad, dynamic=False)
    return _compiled_chunk(logits, targets, softcap)


def rows_per_chunk(n_rows, vocab_size, device):
    """A power of two (B*T usually divides into equal chunks: one compiled shape) within the budget."""
    budget = GPU_CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS
    rows = 1 << max(0, (budget // vocab_size).bit_length() - 1)
    return min(n_rows, rows)


def compute_dtype(x):
    """The matmul dtype autocast would pick for x's device (or x's own dtype outside autocast)."""
    if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@torch.library.custom_op("gpt2_pretrain::linear_cross_entropy", mutates_args=())
def chunked_loss(x: Tensor, weight: Tensor, targets: Tensor, dtype: torch.dtype, softcap: float,
                 want_grad_x: bool, want_grad_weight: bool, compiled: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(summed loss of the valid rows in float32, its gradient of x in x's dtype, of weight in float32);
    a gradient not wanted is an empty tensor. Matmuls in `dtype`; `compiled` compiles the per-chunk softmax."""
    with torch.autocast(x.device.type, enabled=False):  # the dtypes below are chosen by hand
        x_c, weight_c = x.to(dtype), weight.to(dtype)
        grad_x = torch.empty_like(x) if want_grad_x else x.new_empty(0)
        grad_weight = None  # float32, made by the first chunk's product: no zeros to fill and add to
        loss_sum = torch.zeros((), device=x.device, dtype=torch.float32)
        step = rows_per_chunk(x.size(0), weight.size(0), x.device)
        for start in range(0, x.size(0), step):
            chunk_targets = targets[start:start + step]
            x_chunk = x_c[start:start + step]
            logits = x_chunk @ weight_c.t()  # (rows, V): the only logits alive at once
            if not (want_grad_x or want_grad_weight):
                if softcap > 0:
                    logits = cap_logits(logits.float(), softcap)
                loss_sum += F.cross_entropy(logits.float(), chunk_targets, ignore_index=-1, reduction="sum")
                continue
            chunk_loss, grad_logits = chunk_loss_and_grad(logits, chunk_targets, softcap, compiled or x.is_cuda)
            loss_sum += chunk_loss
            valid = (chunk_targets != -1)[:, None]
            if want_grad_x:
                grad_x[start:start + step] = (grad_logits @ weight_c) * valid
            if want_grad_weight:
                x_valid = x_chunk * valid
                if grad_weight is None:
                    grad_weight = (grad_logits.t() @ x_valid).float()
                elif grad_logits.dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.t(), x_valid)  # no (V, C) temporary per chunk
                else:
                    grad_weight += grad_logits.t() @ x_valid  # float32 += bf16 in place
            del logits, grad_logits
    if grad_weight is None:
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_grad_weight else x.new_empty(0)
    return loss_sum, grad_x, grad_weight


@chunked_loss.register_fake
def _(x, weight, targets, dtype, softcap, want_grad_x, want_grad_weight, compiled):
    grad_x = torch.empty_like(x) if want_grad_x else x.new_empty(0)
    grad_weight = torch.empty_like(weight, dtype=torch.float32) if want_grad_weight else x.new_empty(0)
    return x.new_empty((), dtype=torch.float32), grad_x, grad_weight


@register_flop_formula(torch.ops.gpt2_pretrain.linear_cross_entropy)
def _(x_shape, weight_shape, targets_shape, dtype, softcap, want_grad_x, want_grad_weight, *args, **kwargs):
    """the logits' matmul, and one more of the same size for each gradient"""
    return 2 * x_shape[0] * x_shape[1] * weight_shape[0] * (1 + want_grad_x + want_grad_weight)


class LinearCrossEntropy(torch.autograd.Function):
    """mean over valid rows of cross_entropy(x @ weight.T, targets); x (N, C), weight (V, C), targets (N,)."""

    @staticmethod
    def forward(ctx, x, weight, targets, dtype, softcap, grad_enabled):
        # needs_input_grad is true for a Parameter even under no_grad: the caller's grad mode decides
        want_grad_x, want_grad_weight = (grad_enabled and needed for needed in ctx.needs_input_grad[:2])
        # traced by torch.compile, the op's per-chunk softmax is compiled too
        loss_sum, grad_x, grad_weight = chunked_loss(x, weight, targets, dtype, softcap, want_grad_x,
                                                     want_grad_weight, torch.compiler.is_compiling())
        # no valid row gives nan, as F.cross_entropy does
        scale = 1.0 / (targets != -1).sum().to(torch.float32)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_x, grad_weight, scale)
        return loss_sum * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_x, grad_weight, scale = ctx.saved_tensors
        factor = grad_output * scale
        grad_x = grad_x * factor.to(grad_x.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad_weight * factor).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None, None, None, None


def linear_cross_entropy(x, weight, targets, softcap=0.0):
    """Loss of lm_head(x) (no bias) against targets (-1 = ignore) without materializing all the logits;
    softcap > 0 caps the logits at +-softcap (softcap * tanh(logits / softcap)) before the softmax."""
    x = x.reshape(-1, x.size(-1))
    return LinearCrossEntropy.apply(x, weight, targets.reshape(-1), compute_dtype(x), float(softcap),
                                    torch.is_grad_enabled())
