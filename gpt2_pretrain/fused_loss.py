"""The language-model loss without the full logits: lm_head + cross-entropy, a chunk of rows at a time.

Plain `F.cross_entropy(lm_head(x).float(), targets)` holds the (B*T, V) logits, their float32 copy and
the softmax gradient at once: about 5 GB for GPT-2 124M at batch 8 x 1024, 13 GB per float32 copy at
batch 64. Here each chunk of rows gets its logits, its loss and the gradient of both inputs (x and the
lm_head weight) in the forward pass, and the chunk's logits are freed before the next one; backward only
scales the stored gradients. Under no_grad (evaluation) only the loss is computed. Same arithmetic as the
plain loss: logits in the autocast dtype (bf16 on GPUs), softmax in float32, the softmax over every column
of the padded vocabulary, -1 targets ignored.
"""

import torch
import torch.nn.functional as F

# float32 logits kept per chunk: 2**28 elements is 1 GiB (5,300 rows of GPT-2's 50304 columns) on a GPU;
# 2**26 (1,024 rows, 256 MiB) on a CPU, where chunks of fewer rows make the lm_head matmuls slower
GPU_CHUNK_ELEMENTS = 2**28
CPU_CHUNK_ELEMENTS = 2**26


def _chunk_loss_and_grad(logits, targets, dtype, softcap=0.0):
    """Summed loss of the valid rows and d(summed loss)/d(logits), in the logits' dtype.

    Rows of ignored targets (-1) get a gradient too; the caller zeroes them on the narrow side (x's
    rows), which is cheaper than masking all V columns here. softcap > 0: the loss of cap * tanh(logits / cap)."""
    logits = logits.float()  # the softmax in float32 whatever the matmul dtype
    if softcap > 0:
        tanh = torch.tanh(logits / softcap)
        logits = softcap * tanh
    logp = torch.log_softmax(logits, dim=-1)
    valid = targets != -1
    safe_targets = torch.where(valid, targets, 0)[:, None]
    loss_sum = torch.where(valid, -logp.gather(1, safe_targets).squeeze(1), 0.0).sum()
    grad = logp.exp_()  # softmax, in place of log-softmax: one (rows, V) float32 matrix in all
    grad.scatter_add_(1, safe_targets, torch.full_like(safe_targets, -1.0, dtype=grad.dtype))
    if softcap > 0:
        grad *= 1 - tanh.square()  # d(cap * tanh(z / cap))/dz
    return loss_sum, grad.to(dtype)


_compiled_chunk = None


def chunk_loss_and_grad(logits, targets, softcap=0.0):
    """Inside a compiled model inductor fuses this with the rest; an eager model on CUDA gets it compiled
    on its own (two fused kernels instead of seven passes over the logits)."""
    global _compiled_chunk
    if not logits.is_cuda or torch.compiler.is_compiling():
        return _chunk_loss_and_grad(logits, targets, logits.dtype, softcap)
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk_loss_and_grad, dynamic=False)
    return _compiled_chunk(logits, targets, logits.dtype, softcap)


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


class LinearCrossEntropy(torch.autograd.Function):
    """mean over valid rows of cross_entropy(x @ weight.T, targets); x (N, C), weight (V, C), targets (N,)."""

    @staticmethod
    def forward(ctx, x, weight, targets, dtype, grad_enabled, softcap=0.0):
        ctx.weight_dtype = weight.dtype
        with torch.autocast(x.device.type, enabled=False):  # the dtypes below are chosen by hand
            return LinearCrossEntropy._forward(ctx, x, weight, targets, dtype, grad_enabled, softcap)

    @staticmethod
    def _forward(ctx, x, weight, targets, dtype, grad_enabled, softcap):
        n_valid = (targets != -1).sum()
        x_c, weight_c = x.to(dtype), weight.to(dtype)
        # needs_input_grad is true for a Parameter even under no_grad: the caller's grad mode decides
        want_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        grad_x = torch.empty_like(x) if want_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_grad and ctx.needs_input_grad[1] else None
        loss_sum = torch.zeros((), device=x.device, dtype=torch.float32)
        step = rows_per_chunk(x.size(0), weight.size(0), x.device)
        for start in range(0, x.size(0), step):
            valid = (targets[start:start + step] != -1)[:, None]
            x_chunk = x_c[start:start + step]
            logits = x_chunk @ weight_c.t()  # (rows, V): the only logits alive at once
            if not want_grad:
                logits = logits.float()
                if softcap > 0:
                    logits = softcap * torch.tanh(logits / softcap)
                loss_sum += F.cross_entropy(logits, targets[start:start + step], ignore_index=-1, reduction="sum")
                continue
            chunk_loss, grad_logits = chunk_loss_and_grad(logits, targets[start:start + step], softcap)
            loss_sum += chunk_loss
            grad_x[start:start + step] = (grad_logits @ weight_c) * valid
            if grad_weight is not None:
                x_valid = x_chunk * valid
                if grad_logits.dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.t(), x_valid)  # no (V, C) temporary per chunk
                else:
                    grad_weight += (grad_logits.t() @ x_valid).float()
            del logits, grad_logits
        # no valid row gives nan, as F.cross_entropy does
        scale = 1.0 / n_valid.to(torch.float32)
        if want_grad:
            ctx.save_for_backward(grad_x, grad_weight if grad_weight is not None else torch.empty(0), scale)
        return loss_sum * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_x, grad_weight, scale = ctx.saved_tensors
        factor = grad_output * scale
        grad_x = grad_x * factor.to(grad_x.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad_weight * factor).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None, None, None, None


def linear_cross_entropy(x, weight, targets, softcap=0.0):  # torch.compile traces into it: one graph with the model
    """Loss of lm_head(x) (no bias) against targets (-1 = ignore) without materializing all the logits;
    softcap > 0: of the soft-capped logits cap * tanh(logits / cap)."""
    x = x.reshape(-1, x.size(-1))
    return LinearCrossEntropy.apply(x, weight, targets.reshape(-1), compute_dtype(x), torch.is_grad_enabled(),
                                    float(softcap))
