"""Autoregressive sampling from the GPT: temperature, top-k, top-p, end-of-text stopping, KV cache.

`generate` samples token ids; `samples_report` is the samples stage's reports/samples.txt, and
`llm generate` streams the same sampling to a terminal.

With the cache the prompt is run once (prefill) and every later step feeds only the newest token, so a
step costs one token's worth of compute instead of a forward pass over the whole context.

Rows that emit `eot_id` are finished: every later position of that row holds `eot_id` (padding), and
generation stops early once all rows are finished, so the result may be shorter than
T + max_new_tokens. `decode_continuation` cuts a row at its first end-of-text when turning it into text.

Context limit: prompts longer than `max_seq_length` are cropped to their last `max_seq_length` tokens
(with a warning; the returned tensor still starts with the whole prompt). When the sequence outgrows the
context during cached generation the cache is emptied and refilled with the last `max_seq_length`
tokens, each step from then on: the model always sees exactly the window the uncached path sees, so
both paths give the same tokens, and past the context a cached step costs what an uncached one does.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from llm.config import GenerateConfig, check_value
from llm.errors import CheckpointError, ConfigError
from llm.io import sha256_file
from llm.model import Decoder


def _check_settings(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Reject sampling settings that have no meaning, by the ranges of the `generate` params section."""
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens = {max_new_tokens}: must be >= 0")
    for key, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        if value is not None:
            check_value(GenerateConfig, key, value, key)


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Scale (B, V) logits by 1/temperature and set tokens outside the top-k / nucleus to -inf."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the best is kept).
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop = (mass_above >= top_p).scatter(-1, order, mass_above >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from (B, V) logits: argmax when temperature is 0, else a filtered draw."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Minus the best logit (softmax is unchanged), a tiny temperature sends the others to -inf instead of
    # every logit to +-inf: 1e-40 then samples the argmax rather than failing on NaN probabilities.
    logits = logits.float() - logits.float().amax(dim=-1, keepdim=True)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _NextLogits:
    """Logits for the next position of a growing sequence, through the KV cache or a full forward."""

    def __init__(self, model: torch.nn.Module, batch_size: int, total_length: int, use_cache: bool):
        self.model = model
        self.context = model.config.max_seq_length
        self.cache = model.new_kv_cache(batch_size, max_len=min(total_length, self.context)) if use_cache \
            else None
        self.decoder = Decoder(model, self.cache) if use_cache else None

    def __call__(self, sequence: torch.Tensor, length: int) -> torch.Tensor:
        """(B, V) logits predicting sequence[:, length] from (at most a context of) sequence[:, :length]."""
        if self.cache is not None and 0 < self.cache.length < self.context:
            return self.decoder(sequence[:, length - 1])  # the one new token
        window = sequence[:, max(0, length - self.context):length]
        if self.cache is None:
            return self.model(window)[:, -1]
        self.cache.reset()  # first call, or the context is full: (re)fill the cache from the window
        return self.model(window, kv_cache=self.cache)[:, -1]


def generate(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int = 200, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None, eot_id: int | None = None,
             on_token: Callable[[torch.Tensor], Any] | None = None) -> torch.Tensor:
    """Continue each row of `idx` (B, T) by up to `max_new_tokens` tokens; returns (B, T + new).

    `on_token(tokens)` is called after every step with the (B,) tokens just appended, for streaming.
    See the module docstring for end-of-text padding and the context-length behaviour.
    """
    _check_settings(max_new_tokens, temperature, top_k, top_p)
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ConfigError(f"prompt tokens of shape {tuple(idx.shape)}: need (batch, length >= 1); "
                          "give a non-empty prompt")
    batch_size, prompt_length = idx.shape
    context = model.config.max_seq_length
    if prompt_length > context:
        warnings.warn(f"prompt of {prompt_length} tokens exceeds the context ({context}); "
                      f"only its last {context} tokens are used", stacklevel=2)
    sequence = torch.empty(batch_size, prompt_length + max_new_tokens, dtype=torch.long, device=idx.device)
    sequence[:, :prompt_length] = idx
    finished = torch.zeros(batch_size, dtype=torch.bool, device=idx.device)
    was_training = model.training
    model.eval()
    length = prompt_length
    try:
        with torch.inference_mode():  # the result is written into `sequence`, a normal tensor
            next_logits = _NextLogits(model, batch_size, prompt_length + max_new_tokens, use_cache)
            for _ in range(max_new_tokens):
                tokens = sample_next(next_logits(sequence, length), temperature, top_k, top_p, generator)
                if eot_id is not None:
                    tokens = tokens.masked_fill(finished, eot_id)
                    finished |= tokens == eot_id
                sequence[:, length] = tokens
                length += 1
                if on_token is not None:
                    on_token(tokens)
                if eot_id is not None and bool(finished.all()):
                    break
    finally:
        model.train(was_training)
    return sequence[:, :length]


def decode_continuation(tokenizer: Any, prompt_ids: list[int], row: list[int], eot_id: int | None) -> str:
    """Text of generated token ids as it reads after the prompt (`Tokenizer.decode_after`), cut at the
    first end-of-text token (which is not shown)."""
    if eot_id is not None and eot_id in row:
        row = row[:row.index(eot_id)]
    return tokenizer.decode_after(prompt_ids, row)


def check_tokenizer_matches(tokenizer_path: str | os.PathLike, payload: dict[str, Any],
                            checkpoint_path: str | os.PathLike) -> None:
    """Refuse a tokenizer whose sha256 differs from `payload["tokenizer_sha256"]` (a checkpoint's or the
    shards' meta.json): ids from another tokenizer would be silently meaningless."""
    expected = payload.get("tokenizer_sha256")
    if not os.path.isfile(tokenizer_path):
        raise CheckpointError(f"{tokenizer_path}: tokenizer not found; run `dvc repro fit_tokenizer` or "
                              "pass the tokenizer the checkpoint was trained with")
    actual = sha256_file(tokenizer_path)
    if expected is not None and actual != expected:
        raise CheckpointError(f"{tokenizer_path}: sha256 {actual[:12]}... does not match the tokenizer "
                              f"recorded in {checkpoint_path} ({str(expected)[:12]}...); use the tokenizer "
                              "it was made with, or re-run the pipeline (`dvc repro`)")


def sampling_options(top_k: int, top_p: float) -> tuple[int | None, float | None]:
    """params.yaml's 'off' values (top_k 0, top_p 1.0) as generate()'s None."""
    return (top_k or None), (top_p if top_p < 1.0 else None)


def token_tensor(ids: list[int], batch_size: int, device: torch.device) -> torch.Tensor:
    """A (batch_size, len(ids)) LongTensor repeating one prompt per row."""
    if not ids:
        raise ConfigError("prompt: encodes to no tokens; give a non-empty prompt")
    return torch.tensor([ids] * batch_size, dtype=torch.long, device=device)


def unknown_prompt_note(tokenizer: Any, prompt_ids: list[int]) -> str | None:
    """A note when a word-level tokenizer turned prompt words into <unk>: the prompt is shown as typed,
    but the model continues what it sees."""
    unknown = prompt_ids.count(tokenizer.unk_id) if tokenizer.unk_id is not None else 0
    if not unknown:
        return None
    return (f"note: {unknown} word(s) of the prompt are not in the tokenizer's vocabulary; the model sees "
            f"{tokenizer.decode(prompt_ids)!r}")


def samples_report(model: torch.nn.Module, tokenizer: Any, settings: GenerateConfig,
                   checkpoint_step: Any = None) -> str:
    """`settings.num_samples` seeded continuations of `settings.prompt`, headed by the settings used.

    Drawn one after another from one generator, as `llm generate` draws them, so that `llm generate`
    with the same settings (its defaults are params.yaml's `generate` section) prints these samples.
    """
    device = next(model.parameters()).device
    top_k, top_p = sampling_options(settings.top_k, settings.top_p)
    prompt_ids = tokenizer.encode(settings.prompt)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    rows = [generate(model, token_tensor(prompt_ids, 1, device), settings.max_length,
                     temperature=settings.temperature, top_k=top_k, top_p=top_p, generator=generator,
                     eot_id=tokenizer.eot_id)[0] for _ in range(settings.num_samples)]
    header = [f"prompt: {settings.prompt!r}", f"max_length: {settings.max_length}",
              f"temperature: {settings.temperature}", f"top_k: {settings.top_k}", f"top_p: {settings.top_p}",
              f"seed: {settings.seed}", f"checkpoint step: {checkpoint_step}"]
    note = unknown_prompt_note(tokenizer, prompt_ids)
    header += [note, ""] if note else [""]
    body = []
    for number, row in enumerate(rows, start=1):
        text = decode_continuation(tokenizer, prompt_ids, row[len(prompt_ids):].tolist(), tokenizer.eot_id)
        body += [f"=== sample {number} ===", settings.prompt + text, ""]
    return "\n".join(header + body)
