"""Fast paths for the model's elementwise ops, attention and output layer + loss, each with a plain fallback.

model.py calls the five functions at the bottom (`rms_norm`, `relu_squared`, `qkv_heads`,
`attention`, `linear_cross_entropy`); each picks its own implementation, so the model never
branches on device or dtype. Its Decoder (generation's one-token steps) also turns RoPE's
pairs with `rope_turn` and `rotate_pairs_`, which work on every device. On CPU, outside
torch.compile, hand-written autograd functions save memory passes that autograd through the
composite ops would make. Everywhere else (GPUs, and under torch.compile, whose inductor
fuses the plain ops itself) the plain ops run. Both paths give the same numbers, to rounding;
tests/test_model.py checks values and gradients against the plain ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FUSED_LOSS_MIN_VOCAB = 1024  # below this the logits are small and the plain output layer + loss is as fast
COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}  # real dtype: its complex one


def eager_cpu(x: torch.Tensor) -> bool:
    """True where the hand-written CPU autograd functions pay off: on CPU, outside torch.compile."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with ATen's fused forward and a hand-written backward: autograd through the composite
    op costs ~5x a LayerNorm on CPU, this ~3x (torch has no fused RMSNorm backward on CPU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)  # rstd (..., 1)
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, rstd, weight = ctx.saved_tensors
        x_hat = x * rstd
        grad_weight = (grad * x_hat).flatten(0, -2).sum(0)
        grad_x_hat = grad * weight
        dot = torch.linalg.vecdot(grad_x_hat, x_hat).unsqueeze(-1).div_(x.shape[-1])
        return torch.addcmul(grad_x_hat, x_hat, dot, value=-1).mul_(rstd), grad_weight, None


class _ReLU2Function(torch.autograd.Function):
    """relu(x)^2 keeping only relu(x) for backward (d/dx = 2 relu(x)): fewer passes than autograd's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (r,) = ctx.saved_tensors
        return torch.addcmul(grad.new_zeros(()), grad, r, value=2.0)  # 2 r grad in one pass


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in plain real ops, each pair (x[2i], x[2i + 1]) turned by its angle: the GPU and torch.compile
    path (inductor fuses it). x (..., D), cos and sin broadcastable to (..., D/2)."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)


def _complex_pairs(x: torch.Tensor) -> torch.Tensor:
    """x (..., D) as D/2 complex numbers x[2i] + i x[2i + 1], a view where the layout allows; bf16/fp16
    are widened to fp32 first (torch has no complex type for them)."""
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    elif x.stride(-1) != 1 or x.storage_offset() % 2 or any(stride % 2 for stride in x.stride()[:-1]):
        x = x.contiguous()
    return torch.view_as_complex(x.unflatten(-1, (-1, 2)))


def rope_turn(table: torch.Tensor) -> torch.Tensor:
    """The complex turns e^(i angle) (..., D/2) of model.rope_table rows (..., D/2, 2), for rotate_pairs_."""
    return _complex_pairs(table.flatten(-2))


def rotate_pairs_(x: torch.Tensor, turn: torch.Tensor) -> None:
    """Turn each pair (x[2i], x[2i + 1]) of x (..., D) in place: (x[2i] + i x[2i + 1]) * turn, with turn
    complex, broadcastable to (..., D/2). One complex multiply into x's memory in fp32/fp64; else via fp32."""
    pairs = _complex_pairs(x)
    if COMPLEX.get(x.dtype) == turn.dtype and pairs.data_ptr() == x.data_ptr():  # a view of x
        torch.mul(pairs, turn, out=pairs)
    else:
        x.copy_(torch.view_as_real(pairs * turn).flatten(-2))


def _project_rotate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, turn: torch.Tensor,
                    num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, T, H, D): views of the fused projection x @ weight^T + bias, whose q and k parts are
    rotated in place by turn (T, 1, 1, D/2). In place, the rotation reads what the matmul has just
    written, still in cache, and allocates nothing."""
    qkv = F.linear(x, weight, bias)  # (B, T, 3 H D); bf16 under autocast
    B, T, _ = qkv.shape
    heads = qkv.view(B, T, 3, num_heads, -1)
    rotate_pairs_(heads[:, :, :2], turn)
    return heads.unbind(2)


class _QKVRoPEFunction(torch.autograd.Function):
    """The fused QKV projection with q and k rotated (_project_rotate). Backward rotates dq and dk back
    (the angle -theta) into one gradient for the projection and runs its two matmuls: no autograd node
    between projection and rotation, and only what the linear's backward needs saved (its input and
    weight) plus the turns. Under CPU autocast the matmuls run in the autocast dtype, as autocast's own
    linear would, and their bits are the same."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, turn: torch.Tensor,
                num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(x, weight, turn)
        ctx.has_bias = bias is not None
        return _project_rotate(x, weight, bias, turn, num_heads)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None]:
        x, weight, turn = ctx.saved_tensors
        B, T, H, D = dv.shape
        grad = torch.empty(B, T, 3, H, D, dtype=dv.dtype, device=dv.device)
        turn_back = turn[:, 0].conj()  # (T, 1, D/2)
        for slot, g in enumerate((dq, dk)):
            if COMPLEX.get(grad.dtype) == turn.dtype:
                torch.mul(_complex_pairs(g), turn_back, out=_complex_pairs(grad[:, :, slot]))
            else:
                grad[:, :, slot] = torch.view_as_real(_complex_pairs(g) * turn_back).flatten(-2)
        grad[:, :, 2] = dv
        grad = grad.view(B * T, 3 * H * D)
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_x = (grad @ weight.to(grad.dtype)).view(x.shape).to(x.dtype) if need_x else None
        rows = x.reshape(B * T, -1).to(grad.dtype)
        grad_weight = (grad.t() @ rows).to(weight.dtype) if need_weight else None
        grad_bias = grad.sum(0).to(weight.dtype) if ctx.has_bias and need_bias else None
        return grad_x, grad_weight, grad_bias, None, None


class _CausalAttentionFunction(torch.autograd.Function):
    """Causal attention: torch's flash kernel forward, and a backward that recomputes the attention weights
    with batched matmuls over a cache-sized chunk of heads at a time (FlashAttention's backward, in
    torch ops). In bf16 on CPU torch's own flash backward is slow: at benchmarks/train.py config L
    this runs forward + backward in 39 vs 45 ms a layer, and 2-3x faster at contexts 64-128; in fp32
    torch's is faster, so only bf16 comes here."""

    CHUNK_SCORES = 1 << 18  # heads per chunk = this // T^2: 1 MiB of fp32 attention weights

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, out = ctx.saved_tensors
        B, H, T, D = q.shape
        scale = D ** -0.5
        q, k, v, grad = (t.reshape(B * H, T, D) for t in (q, k, v, grad))  # heads as one batch dim
        wide = torch.promote_types(q.dtype, torch.float32)  # softmax and its gradient: at least fp32
        delta = torch.linalg.vecdot(grad.to(wide), out.reshape(B * H, T, D).to(wide)).unsqueeze_(-1)
        future = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
        dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
        step = max(1, _CausalAttentionFunction.CHUNK_SCORES // (T * T))
        for start in range(0, B * H, step):
            c = slice(start, start + step)
            scores = torch.baddbmm(future, q[c], k[c].mT, alpha=scale)
            probs = torch.softmax(scores, dim=-1, dtype=wide)
            torch.bmm(probs.to(v.dtype).mT, grad[c], out=dv[c])
            scores_grad = torch.sub(torch.bmm(grad[c], v[c].mT), delta[c])  # `wide`, by type promotion
            scores_grad = scores_grad.mul_(probs).mul_(scale).to(q.dtype)
            torch.bmm(scores_grad, k[c], out=dq[c])
            torch.bmm(scores_grad.mT, q[c], out=dk[c])
        return dq.view(B, H, T, D), dk.view(B, H, T, D), dv.view(B, H, T, D)


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Mean cross-entropy of (x @ weight^T) against targets without materializing the (N, V) logits: rows
    go through in chunks that stay in cache, and each chunk's gradients (softmax - one-hot) are formed
    on the spot, so backward only scales them. Targets equal to -1 are ignored, as in
    F.cross_entropy(ignore_index=-1).

    `dtype` is the matmuls' precision: bf16 under CPU autocast, as F.linear would run there (logits
    rounded to bf16, softmax in fp32); the weight gradient is then one bf16 matmul over all rows.
    At benchmarks/train.py config L (2048 rows, vocab 10k, one thread) forward + backward take
    465 vs 558 ms in fp32 and 229 vs 318 ms under bf16 autocast."""

    CHUNK_ROWS = 512

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype
                ) -> torch.Tensor:
        low = dtype != torch.float32
        xc, wc = x.to(dtype), weight.to(dtype)
        grad_x = torch.empty_like(x)
        grad_logits = torch.empty(x.shape[0], weight.shape[0], dtype=dtype) if low else None  # (N, V)
        grad_weight = None if low else torch.zeros_like(weight)
        total, count = torch.zeros((), dtype=torch.float32), (targets != -1).sum()
        for start in range(0, x.shape[0], _LinearCrossEntropyFunction.CHUNK_ROWS):
            rows = slice(start, start + _LinearCrossEntropyFunction.CHUNK_ROWS)
            chunk, target = xc[rows], targets[rows]
            kept = (target != -1).float()[:, None]  # (n, 1)
            target = target.clamp(min=0)[:, None]
            log_probs = torch.log_softmax(chunk @ wc.t(), dim=-1, dtype=torch.float32)  # (n, V)
            total -= (log_probs.gather(1, target) * kept).sum()
            probs = log_probs.exp_().scatter_add_(1, target, -kept)  # d loss_i / d logits_i
            if not bool(kept.all()):
                probs.mul_(kept)  # ignored rows have no gradient
            if low:
                grad_logits[rows] = probs
                grad_x[rows] = grad_logits[rows] @ wc
            else:
                torch.mm(probs, weight, out=grad_x[rows])
                grad_weight.addmm_(probs.t(), chunk)
        if low:
            grad_weight = (grad_logits.t() @ xc).to(weight.dtype)
        count = count.clamp(min=1).float()
        ctx.save_for_backward(grad_x, grad_weight, count)
        return total / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        grad_x, grad_weight, count = ctx.saved_tensors
        scale = grad / count
        return grad_x * scale.to(grad_x.dtype), grad_weight * scale, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (Zhang & Sennrich 2019): x / rms(x) * weight."""
    if eager_cpu(x) and x.dtype == weight.dtype:
        return _RMSNormFunction.apply(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 (So et al. 2021, Primer)."""
    if not eager_cpu(x):
        return torch.relu(x).square()
    if torch.is_grad_enabled():
        return _ReLU2Function.apply(x)
    r = torch.relu(x)
    return r.mul_(r)  # no autograd to keep relu(x) for: square it in place


def qkv_heads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int,
              rope: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, T, H, D) from the fused projection x @ weight^T + bias (B, T, 3 H D); with rope, the
    (T, 1, D/2, 2) cos/sin table of model.rope_table, q and k rotated by their positions' angles."""
    if rope is not None and eager_cpu(x):
        turn = rope_turn(rope)[:, None]  # (T, 1, 1, D/2)
        if torch.is_grad_enabled():
            return _QKVRoPEFunction.apply(x, weight, bias, turn, num_heads)
        return _project_rotate(x, weight, bias, turn, num_heads)  # generation: no autograd function
    qkv = F.linear(x, weight, bias)
    B, T, _ = qkv.shape
    q, k, v = qkv.view(B, T, 3, num_heads, -1).unbind(2)  # strided views: no copy
    if rope is None:
        return q, k, v
    cos, sin = rope.to(qkv.dtype).unbind(-1)  # (T, 1, D/2) each
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              dropout_p: float, is_causal: bool) -> torch.Tensor:
    """F.scaled_dot_product_attention over (B, H, T|S, D); training in bf16 on CPU with a plain causal
    mask and no dropout takes _CausalAttentionFunction's faster backward."""
    if (is_causal and mask is None and dropout_p == 0 and q.dtype == torch.bfloat16 and eager_cpu(q)
            and torch.is_grad_enabled() and q.requires_grad):
        return _CausalAttentionFunction.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) of the logits x @ weight^T (N, V) against targets (N,), -1 ignored.

    Training on CPU with a large vocabulary never builds the logits (_LinearCrossEntropyFunction, in
    fp32 or in autocast's bf16); elsewhere it is F.linear + F.cross_entropy.
    """
    if torch.is_grad_enabled() and eager_cpu(x) and weight.shape[0] >= FUSED_LOSS_MIN_VOCAB:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if dtype in (torch.float32, torch.bfloat16):
            with torch.autocast("cpu", enabled=False):  # the function casts for itself
                return _LinearCrossEntropyFunction.apply(x, weight, targets, dtype)
    return F.cross_entropy(F.linear(x, weight), targets, ignore_index=-1)
