"""Will it fit? A lower bound on the memory of a training run or a loaded model, checked before allocating.

A run that cannot fit should fail in one line before the first tensor is made, not with an allocator
traceback, an OOM kill, or an hour of swapping. The estimate counts what must exist at the peak of a
training step and leaves out what depends on kernels and allocators, so it errs on the side of letting
a run try:

- weights and their gradients: 4 bytes each per parameter (fp32 master weights, also under autocast);
- optimizer state: AdamW's two moments (8 bytes per parameter); Muon keeps one momentum (4 bytes) for
  the hidden matrices and AdamW's two for the rest;
- activations that autograd keeps for one micro-batch: per token and layer at least the block's input,
  both norm outputs, q/k/v, the attention output, its projection, and the feed-forward's hidden
  pre- and post-activation: 8 x d_model + 2 x hidden values (2 bytes each under bf16/fp16 autocast,
  else 4). Attention scores and logits are not counted (fused kernels may never store them).

The parameter count is exact: it follows llm.model's shapes, and a test holds the two equal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from llm.config import ModelConfig, TrainConfig
from llm.errors import ConfigError
from llm.model import swiglu_hidden

GIB = 1 << 30


@dataclass(frozen=True)
class Estimate:
    """Bytes of one process's share of a training run, by kind."""

    parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


def parameter_counts(config: ModelConfig) -> tuple[int, int]:
    """(all parameters, those in Muon's hidden matrices) of the GPT that llm.model builds from `config`.

    Counted from the shapes rather than by building the model on the meta device, which costs a second
    per process; tests/test_memory.py holds this count equal to GPT(config).num_params() over the knobs.
    """
    d, layers, vocab = config.d_model, config.num_layers, config.vocab_size
    hidden, widen = _feed_forward(config)
    matrices = layers * (3 * d * d + d * d + d * widen + hidden * d)  # qkv, proj, up, down
    biases = layers * (3 * d + d + widen + d) if config.bias else 0
    norm = 2 * d if config.norm == "layernorm" and config.bias else d
    embeddings = vocab * d * (1 if config.tie_weights else 2)  # token embedding (+ untied output layer)
    positions = config.max_seq_length * d if config.position == "learned" else 0
    return embeddings + positions + matrices + biases + (2 * layers + 1) * norm, matrices


def _feed_forward(config: ModelConfig) -> tuple[int, int]:
    """(hidden width, up-projection width) of the feed-forward layer (SwiGLU: gate and value side by side)."""
    if config.activation == "swiglu":
        hidden = swiglu_hidden(config.d_ff)
        return hidden, 2 * hidden
    return config.d_ff, config.d_ff


def estimate_training(config: ModelConfig, train: TrainConfig, world: int = 1,
                      precision: str = "fp32") -> Estimate:
    """A lower bound on one process's memory for training `config` with `train` on `world` processes."""
    parameters, hidden = parameter_counts(config)
    adam = parameters - hidden if train.optimizer == "muon" else parameters
    optimizer = 8 * adam + 4 * (parameters - adam)
    micro_batch = max(1, train.batch_size // (world * train.grad_accum_steps))
    tokens = micro_batch * config.max_seq_length
    per_token_layer = 8 * config.d_model + 2 * _feed_forward(config)[1]
    element = 4 if precision == "fp32" else 2
    activations = tokens * config.num_layers * per_token_layer * element
    return Estimate(parameters, 4 * parameters, 4 * parameters, optimizer, activations)


def device_memory(device: torch.device) -> int | None:
    """Total memory of `device` in bytes (for the CPU: physical RAM, shared by this machine's processes),
    or None when it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        return int(torch.mps.recommended_max_memory())
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
        return None


def _gib(size: int) -> str:
    return f"{size / GIB:,.1f} GiB"


def check_training_fits(config: ModelConfig, train: TrainConfig, device: torch.device, world: int = 1,
                        precision: str = "fp32", source: str = "params.yaml") -> None:
    """ConfigError, before anything is allocated, when even the lower bound does not fit on `device`.

    On the CPU the processes of one machine share its memory (torchrun's LOCAL_WORLD_SIZE of them).
    """
    available = device_memory(device)
    if available is None:
        return
    estimate = estimate_training(config, train, world, precision)
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type in ("cpu", "mps") else 1
    needed = estimate.total * sharing
    if needed <= available:
        return
    per = f" x {sharing} processes" if sharing > 1 else ""
    micro_batch = max(1, train.batch_size // (world * train.grad_accum_steps))
    raise ConfigError(
        f"{source}: model (d_model {config.d_model}, num_layers {config.num_layers}, d_ff {config.d_ff}, "
        f"vocab_size {config.vocab_size}: {estimate.parameters:,} parameters) trained with "
        f"train.batch_size {train.batch_size} needs at least {_gib(needed)}{per} (weights "
        f"{_gib(estimate.weights)}, gradients {_gib(estimate.gradients)}, {train.optimizer} state "
        f"{_gib(estimate.optimizer)}, activations {_gib(estimate.activations)} for {micro_batch} x "
        f"{config.max_seq_length} tokens), but the {device.type} has {_gib(available)}; make "
        "model.d_model, model.num_layers or model.d_ff smaller, or raise train.grad_accum_steps to cut "
        "the batch into smaller micro-batches")


def check_weights_fit(config: ModelConfig, source: str) -> None:
    """ConfigError when the weights alone of a stored model would not fit in this machine's memory."""
    available = device_memory(torch.device("cpu"))
    parameters, _ = parameter_counts(config)
    if available is not None and 4 * parameters > available:
        raise ConfigError(f"{source}: its model has {parameters:,} parameters ({_gib(4 * parameters)}), "
                          f"more than this machine's memory ({_gib(available)}); use a smaller model")
