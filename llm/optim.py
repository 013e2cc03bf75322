"""Optimizers of the trainer: AdamW, or Muon for the hidden matrices with AdamW for the rest.

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"; used by the
modded-nanogpt speedruns) replaces each 2-D hidden weight's momentum update by its nearest
semi-orthogonal matrix, computed with a quintic Newton-Schulz iteration. Embeddings, the output
layer, norms and biases keep AdamW, as in the reference. Updates are scaled by
0.2 * sqrt(max(rows, cols)) (Liu et al. 2025, "Muon is Scalable for LLM Training"), which gives them
the RMS of a typical AdamW update, so `train.muon_lr` is on AdamW's scale and weight decay means the
same in both halves.

Measured on tiny Shakespeare with `benchmarks/quality.py` (README, "Optimizer"): Muon needs ~20%
fewer steps than AdamW at its best rate for the same validation loss and is far less sensitive to the
AdamW rate; on a 2-core CPU its orthogonalization costs about what it saves for a 0.5-0.9M-parameter
model; for the default model it adds an estimated ~10% to a step's FLOPs (not yet timed on a GPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from llm.hardware import cpu_has_native_bf16
from llm.model import GPT

# Coefficients of the quintic Newton-Schulz step, tuned by Jordan et al. to push every singular value
# of a normalized matrix into roughly [0.7, 1.2] within five steps.
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalize(update: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately U V^T for update = U S V^T, batched over leading dims; computed in `dtype`, by default
    bf16 (as the reference does on GPUs: the iteration tolerates the rounding), except on CPUs without
    native bf16, where fp32 is faster. On a CPU with AMX, bf16 runs it 1.4x (128 x 512 blocks) to 4x
    (512 x 512) faster."""
    if dtype is None:
        slow_bf16 = update.device.type == "cpu" and not cpu_has_native_bf16()
        dtype = torch.float32 if slow_bf16 else torch.bfloat16
    x = update.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    a, b, c = NEWTON_SCHULZ
    for _ in range(steps):
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    if tall:
        x = x.mT
    return x.to(update.dtype)


class Muon(torch.optim.Optimizer):
    """Muon on groups with `use_muon=True` (2-D weights, each a stack of `blocks` matrices along dim 0),
    AdamW on the other groups; one optimizer, so the trainer's schedule, clipping, GradScaler and
    checkpoints treat it like AdamW.

    A fused QKV weight (3C, C) is three matrices, so its group says blocks=3 and each C x C block is
    orthogonalized on its own, as if the projections were separate layers.
    """

    def __init__(self, groups: Iterable[dict], lr: float, betas: tuple[float, float], momentum: float = 0.95,
                 eps: float = 1e-8):
        defaults = dict(lr=lr, betas=betas, momentum=momentum, eps=eps, weight_decay=0.0, use_muon=False,
                        blocks=1)
        super().__init__(list(groups), defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient.

        Muon's matrices are orthogonalized in batches of one shape, so a model's dozens of small
        matrices cost a few batched matmuls instead of hundreds.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        by_shape: dict[tuple[int, int], list[tuple[torch.Tensor, dict, torch.Tensor]]] = {}
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if not group["use_muon"]:
                    self._adamw_update(param, group)
                    continue
                blocks = self._nesterov_momentum(param, group).view(group["blocks"], -1, param.size(-1))
                by_shape.setdefault(tuple(blocks.shape[1:]), []).append((param, group, blocks))
        for (rows, cols), items in by_shape.items():
            updates = orthogonalize(torch.cat([blocks for _, _, blocks in items]))
            scale = 0.2 * math.sqrt(max(rows, cols))  # Liu et al.: matches AdamW's update RMS
            for (param, group, _), update in zip(items, updates.split([b.size(0) for _, _, b in items])):
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update.view_as(param), alpha=-group["lr"] * scale)
        return loss

    def _nesterov_momentum(self, param: torch.Tensor, group: dict) -> torch.Tensor:
        """Update the momentum buffer with the gradient; return the Nesterov look-ahead direction."""
        state = self.state[param]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(param)
        buffer = state["momentum_buffer"]
        buffer.lerp_(param.grad, 1 - group["momentum"])
        return param.grad.lerp(buffer, group["momentum"])

    def _adamw_update(self, param: torch.Tensor, group: dict) -> None:
        """AdamW (Loshchilov & Hutter 2019) with bias correction, as torch.optim.AdamW computes it."""
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = state["step"]
        state["exp_avg"].lerp_(param.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
        param.mul_(1 - group["lr"] * group["weight_decay"])
        param.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** step))


def make_optimizer(model: GPT, lr: float, weight_decay: float, betas: tuple[float, float],
                   device: torch.device | str, *, optimizer: str = "adamw", muon_lr: float | None = None,
                   ) -> torch.optim.Optimizer:
    """The optimizer `train.optimizer` names; every group records its peak rate in `peak_lr`.

    adamw: torch's AdamW over model.optimizer_groups, fused (one kernel for all params) on CUDA and CPU.
    muon: Muon at muon_lr (default lr) on the hidden matrices, AdamW at lr on the rest.
    """
    if optimizer == "adamw":
        fused = torch.device(device).type in ("cuda", "cpu")
        result: torch.optim.Optimizer = torch.optim.AdamW(model.optimizer_groups(weight_decay), lr=lr,
                                                          betas=betas, fused=fused)
    elif optimizer == "muon":
        groups = model.optimizer_groups(weight_decay, muon=True)
        for group in groups:
            if group.get("use_muon"):
                group["lr"] = lr if muon_lr is None else muon_lr
        result = Muon(groups, lr=lr, betas=betas)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose adamw or muon")
    for group in result.param_groups:
        group["peak_lr"] = group["lr"]
    return result
