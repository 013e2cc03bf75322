"""The GPT: token embedding, positions, pre-norm causal self-attention blocks, final norm, output layer.

One readable file in the spirit of nanoGPT's model.py (Karpathy), with the knobs of
`ModelConfig`: position (learned | sinusoidal | rope), norm (layernorm | rmsnorm),
activation (gelu | swiglu | relu2), tie_weights and bias. Attention runs through
`torch.nn.functional.scaled_dot_product_attention`; a `KVCache` makes generation
process only the new tokens while giving the same logits as a full forward, and a
`Decoder` runs generation's one-token steps without the modules' per-call overhead.

Shapes: B batch, T new tokens, S cached + new tokens, H heads, D head size, C = d_model, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from llm import kernels
from llm.config import ModelConfig, check_model_config

INIT_STD = 0.02  # GPT-2's init scale for every weight matrix


def swiglu_hidden(d_ff: int) -> int:
    """SwiGLU width 2/3 * d_ff (rounded up to a multiple of 8): three matrices cost what GELU's two do."""
    return max(8, (2 * d_ff // 3 + 7) // 8 * 8)


class KVCache:
    """Keys and values of every layer for positions 0..length-1, preallocated up to max_len."""

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, max_len: int, head_size: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch_size, num_heads, max_len, head_size)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0

    def reset(self) -> None:
        """Forget all cached positions (the buffers are reused)."""
        self.length = 0

    def check_room(self, batch_size: int, new_tokens: int) -> None:
        """Raise if a forward of `new_tokens` would not fit: the caller must crop or reset first."""
        if batch_size != self.batch_size:
            raise ValueError(f"KV cache was made for batch size {self.batch_size}, got a batch of "
                             f"{batch_size}; make a new cache with model.new_kv_cache")
        if self.length + new_tokens > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length} cached + {new_tokens} new tokens > max_len "
                             f"{self.max_len}; crop the context to the last max_seq_length tokens and reset")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) at positions length..length+T-1; return all keys/values (B, H, S, D)."""
        keys, values, end = self.keys[layer], self.values[layer], self.length + k.size(2)
        keys.narrow(2, self.length, k.size(2)).copy_(k)
        values.narrow(2, self.length, v.size(2)).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameters and state dict) computed by kernels.rms_norm (fused backward on CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


def make_norm(config: ModelConfig) -> nn.Module:
    """LayerNorm (GPT-2) or RMSNorm (no mean, no bias); bias follows config.bias for LayerNorm."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, eps=1e-5)
    return nn.LayerNorm(config.d_model, eps=1e-5, bias=config.bias)


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """Vaswani et al. (2017) sin/cos table (length, dim), scaled to the token embeddings' init RMS (0.02)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)[:, : dim // 2]
    return table * (INIT_STD * math.sqrt(2.0))  # sin/cos have RMS 1/sqrt(2)


def rope_table(length: int, head_size: int, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding (Su et al. 2021, RoFormer, eq. 34): each pair (x[2i], x[2i + 1]) of a head turns
    by position * base^(-2i / D). Returns (length, 1, D/2, 2) holding (cos, sin) of those angles."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (length, D/2)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)[:, None]


def dropout(p: float) -> nn.Module:
    """nn.Dropout(p), or nn.Identity when p is 0: no call into torch's dropout on every step."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused QKV projection and SDPA."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.num_heads, self.head_size = config.num_heads, config.d_model // config.num_heads
        self.layer = layer  # index of this layer's slot in a KVCache
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.proj.residual_projection = True  # scaled init, see GPT._init_weights
        self.dropout = config.dropout
        self.resid_dropout = dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None, kv_cache: KVCache | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = kernels.qkv_heads(x, self.qkv.weight, self.qkv.bias, self.num_heads, rope)  # (B, T, H, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        mask, causal = None, True
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.update(self.layer, k, v)  # (B, H, S, D), S = past + T
            if k.dtype != q.dtype:  # a cache kept in another precision (new_kv_cache(dtype=...))
                k, v = k.to(q.dtype), v.to(q.dtype)
            if past > 0:  # query i sits at position past + i and sees keys 0..past + i
                causal = False
                if T > 1:
                    key_pos = torch.arange(past + T, device=x.device)
                    mask = key_pos[None, :] <= (key_pos[past:, None])  # (T, S), True = attend
        y = kernels.attention(q, k, v, mask, self.dropout if self.training else 0.0, causal)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    """Position-wise MLP: d_model -> d_ff -> d_model with GELU, ReLU^2 or SwiGLU.

    GELU is the exact (erf) form, as in nanoGPT and torch's default: ATen's tanh approximation (GPT-2's)
    costs ~4x more per element on CPU (0.69 vs 0.16 ms forward at 768 x 512, one thread).

    SwiGLU has three matrices, so its hidden width is swiglu_hidden(d_ff) ~ 2/3 d_ff to keep the
    parameter count and FLOPs of the two-matrix variants (Shazeer 2020, as in LLaMA).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.activation = config.activation
        hidden = swiglu_hidden(config.d_ff) if self.activation == "swiglu" else config.d_ff
        widen = 2 * hidden if self.activation == "swiglu" else hidden  # swiglu: gate and value in one matmul
        self.up = nn.Linear(config.d_model, widen, bias=config.bias)
        self.down = nn.Linear(hidden, config.d_model, bias=config.bias)
        self.down.residual_projection = True
        self.dropout = dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(self.activate(self.up(x))))

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu2":  # So et al. 2021 (Primer)
            return kernels.relu_squared(h)
        if self.activation == "gelu":
            return F.gelu(h)
        gate, value = h.chunk(2, dim=-1)
        return F.silu(gate) * value


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.norm1, self.attn = make_norm(config), CausalSelfAttention(config, layer)
        self.norm2, self.mlp = make_norm(config), FeedForward(config)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None, kv_cache: KVCache | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, kv_cache)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Decoder-only transformer language model: forward(idx) -> logits; forward(idx, targets) -> mean loss."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        check_model_config(config, source="ModelConfig")
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        if config.position == "learned":
            self.position_embedding = nn.Embedding(config.max_seq_length, config.d_model)
        elif config.position == "sinusoidal":
            self.register_buffer("position_table", sinusoidal_table(config.max_seq_length, config.d_model),
                                 persistent=False)
        else:
            table = rope_table(config.max_seq_length, config.d_model // config.num_heads)
            self.register_buffer("rope_cos_sin", table, persistent=False)
        self.dropout = dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.num_layers))
        self.final_norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.token_embedding.weight  # one matrix: embedding and output layer
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init (Radford et al. 2019, sec. 2.3; as in nanoGPT): N(0, 0.02), zero biases, and the
        projections that write into the residual stream scaled by 1/sqrt(2 * num_layers)."""
        if isinstance(module, nn.Linear):
            std = INIT_STD / math.sqrt(2 * self.config.num_layers) if hasattr(module, "residual_projection") \
                else INIT_STD
            nn.init.normal_(module.weight, mean=0.0, std=std)  # a tied lm_head redraws the same N(0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)

    def num_params(self, non_embedding: bool = False) -> int:
        """Distinct parameters; non_embedding drops lookup tables (position, untied token embedding) but
        keeps the output layer, a real matmul (as nanoGPT counts a tied wte)."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.config.position == "learned":
                total -= self.position_embedding.weight.numel()
            if not self.config.tie_weights:
                total -= self.token_embedding.weight.numel()
        return total

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward): 6 N + 12 L C T (Kaplan et al. 2020; PaLM app. B)."""
        c = self.config
        return 6.0 * self.num_params(non_embedding=True) + 12.0 * c.num_layers * c.d_model * c.max_seq_length

    def hidden_matrices(self) -> dict[nn.Parameter, int]:
        """The 2-D weights inside the blocks (what Muon optimizes), each with the number of matrices it
        stacks along dim 0: 3 for the fused QKV projection, 2 for SwiGLU's gate and value, else 1."""
        matrices: dict[nn.Parameter, int] = {}
        for block in self.blocks:
            matrices[block.attn.qkv.weight] = 3
            matrices[block.attn.proj.weight] = 1
            matrices[block.mlp.up.weight] = 2 if self.config.activation == "swiglu" else 1
            matrices[block.mlp.down.weight] = 1
        return matrices

    def optimizer_groups(self, weight_decay: float, muon: bool = False) -> list[dict]:
        """Parameter groups: decay on matrices (>= 2-D: linear weights, embeddings), none on biases and
        norms. With muon, the hidden matrices come first in groups flagged use_muon, one per block count."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = []
        if muon:
            hidden = self.hidden_matrices()
            for blocks in sorted(set(hidden.values())):
                groups.append({"params": [p for p in params if hidden.get(p) == blocks], "use_muon": True,
                               "blocks": blocks, "weight_decay": weight_decay})
            params = [p for p in params if p not in hidden]
        return groups + [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
                     ) -> KVCache:
        """An empty KVCache on the model's device and dtype, for up to max_len (default max_seq_length)."""
        c, weight = self.config, self.lm_head.weight
        max_len = c.max_seq_length if max_len is None else max_len
        if not 1 <= max_len <= c.max_seq_length:
            raise ValueError(f"KV cache max_len {max_len} must be in 1..max_seq_length ({c.max_seq_length})")
        return KVCache(c.num_layers, batch_size, c.num_heads, max_len, c.d_model // c.num_heads,
                       weight.device, dtype or weight.dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, V) for token ids idx (B, T); with targets (B, T), the mean cross-entropy (nats)
        over targets != -1 instead, and no logits (kernels.linear_cross_entropy may never build them).

        With kv_cache, idx holds positions cache.length .. cache.length + T - 1: their keys/values are
        appended and cache.length advances by T.
        """
        B, T = idx.shape
        start = 0
        if kv_cache is not None:
            kv_cache.check_room(B, T)
            start = kv_cache.length
        if start + T > self.config.max_seq_length:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_length "
                             f"({self.config.max_seq_length}); crop the input to the last "
                             f"{self.config.max_seq_length} tokens")
        x = self.token_embedding(idx)  # (B, T, C)
        rope = None
        if self.config.position == "learned":
            x = x + self.position_embedding.weight[start:start + T]
        elif self.config.position == "sinusoidal":
            x = x + self.position_table[start:start + T]
        else:
            rope = self.rope_cos_sin[start:start + T]  # (T, 1, D/2, 2)
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, rope, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.final_norm(x)
        if targets is None:
            return self.lm_head(x)  # (B, T, V)
        return kernels.linear_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(B * T))


def _norm_function(norm: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The norm layer as a function of its input alone (no module call)."""
    if isinstance(norm, RMSNorm):
        return partial(torch.rms_norm, normalized_shape=norm.normalized_shape, weight=norm.weight,
                       eps=norm.eps)
    return partial(torch.layer_norm, normalized_shape=norm.normalized_shape, weight=norm.weight,
                   bias=norm.bias, eps=norm.eps)


def _activation_function(mlp: FeedForward) -> Callable[[torch.Tensor], torch.Tensor]:
    """mlp.activate, except ReLU^2 squares in place in the up projection's output (nothing else reads it)."""
    if mlp.activation == "relu2":
        return lambda hidden: hidden.relu_().square_()
    return mlp.activate


def _project(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight_t + bias for rows x (B, C): a linear layer whose weight was transposed in advance."""
    return torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)


def _add_projection_(x: torch.Tensor, y: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None
                     ) -> None:
    """x += y @ weight_t + bias, in place: a residual branch's output projection as one matmul into x."""
    x.addmm_(y, weight_t)
    if bias is not None:
        x.add_(bias)


class Decoder:
    """GPT.forward for one new token per row, for generation's inner loop (no autograd: call it under
    torch.inference_mode or no_grad). decoder(tokens) gives the logits (B, V) that
    model(tokens[:, None], kv_cache=kv_cache)[:, -1] would, and advances the cache by one position.

    Every layer's weights are looked up (and transposed) once, here, and a layer is ~15 functional ops on
    (B, C) rows: no module calls, transposes or masks, and the residual branches' output projections
    accumulate into the residual stream in place. At batch 1 on CPU a token is a few ms of matrix-vector
    products, and the Python between them costs more than its own time (benchmarks/generate.py, same
    day, vs Hugging Face's cached generate: 1.23-1.44x through the modules, 1.59-1.68x this way).
    """

    def __init__(self, model: GPT, kv_cache: KVCache):
        self.cache, self.context = kv_cache, model.config.max_seq_length
        self.num_heads = model.config.num_heads
        self.embedding, self.head_t = model.token_embedding.weight, model.lm_head.weight.t()
        self.final_norm = _norm_function(model.final_norm)
        self.positions = self.turns = None  # added to the embedding (max_seq_length, C) | RoPE's turns
        if model.config.position == "learned":
            self.positions = model.position_embedding.weight
        elif model.config.position == "sinusoidal":
            self.positions = model.position_table
        else:
            self.turns = kernels.rope_turn(model.rope_cos_sin)  # (max_seq_length, 1, D/2)
        self.layers = [(_norm_function(block.norm1), block.attn.qkv.weight.t(), block.attn.qkv.bias,
                        block.attn.proj.weight.t(), block.attn.proj.bias, _norm_function(block.norm2),
                        block.mlp.up.weight.t(), block.mlp.up.bias, _activation_function(block.mlp),
                        block.mlp.down.weight.t(), block.mlp.down.bias) for block in model.blocks]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) for tokens (B,) at position cache.length."""
        B, position = tokens.shape[0], self.cache.length
        self.cache.check_room(B, 1)
        if position >= self.context:
            raise ValueError(f"position {position} is past max_seq_length ({self.context}); crop the context "
                             "to the last max_seq_length tokens and reset the cache")
        x = F.embedding(tokens, self.embedding)  # (B, C), a new tensor: the layers add into it
        if self.positions is not None:
            x = x + self.positions[position]
        turn = None if self.turns is None else self.turns[position]  # (1, D/2): e^(i angle) for every head
        for layer, (norm1, qkv_t, qkv_b, proj_t, proj_b, norm2, up_t, up_b, activate, down_t, down_b) \
                in enumerate(self.layers):
            qkv = _project(norm1(x), qkv_t, qkv_b).view(B, 3, self.num_heads, 1, -1)  # (B, 3, H, 1, D)
            if turn is not None:
                kernels.rotate_pairs_(qkv[:, :2], turn)
            k, v = self.cache.update(layer, qkv[:, 1], qkv[:, 2])  # (B, H, S, D)
            if k.dtype != qkv.dtype:  # a cache kept in another precision
                k, v = k.to(qkv.dtype), v.to(qkv.dtype)
            y = F.scaled_dot_product_attention(qkv[:, 0], k, v)  # (B, H, 1, D): every key is past
            _add_projection_(x, y.reshape(B, -1), proj_t, proj_b)
            _add_projection_(x, activate(_project(norm2(x), up_t, up_b)), down_t, down_b)
        self.cache.length += 1
        return torch.mm(self.final_norm(x), self.head_t)
