"""Sampling and the KV cache: cached == uncached, top-k/top-p limits, seeding, end-of-text, cropping."""

from __future__ import annotations

import warnings

import pytest
import torch

from llm.config import ModelConfig
from llm.errors import ConfigError
from llm.generate import filter_logits, generate
from llm.model import GPT

VOCAB, CONTEXT = 61, 16


def tiny_gpt(position: str = "rope", seed: int = 0) -> GPT:
    """A random 2-layer GPT; weights drawn wide (std 0.3) so greedy output depends on the whole context."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=VOCAB, d_model=32, num_heads=2, num_layers=2, d_ff=64,
                         max_seq_length=CONTEXT, dropout=0.0, position=position)
    model = GPT(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model


def prompt(batch: int = 2, length: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rope"])
def test_greedy_with_cache_equals_greedy_without(position: str) -> None:
    model = tiny_gpt(position)
    idx = prompt(batch=2, length=5)
    # 5 + 30 tokens outgrow the 16-token context, so the cache's refill past the context is covered too.
    cached = generate(model, idx, max_new_tokens=30, temperature=0, use_cache=True)
    uncached = generate(model, idx, max_new_tokens=30, temperature=0, use_cache=False)
    assert cached.shape == (2, 35)
    assert torch.equal(cached[:, :5], idx)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0, 5:].tolist())) > 1  # a model stuck on one token would prove little


def test_greedy_is_the_argmax_of_a_full_forward() -> None:
    model = tiny_gpt()
    idx = prompt(batch=1, length=4)
    out = generate(model, idx, max_new_tokens=3, temperature=0)
    for step in range(3):
        logits = model(out[:, :4 + step])
        assert out[0, 4 + step] == logits[0, -1].argmax()


def test_top_k_1_and_tiny_top_p_equal_greedy() -> None:
    model = tiny_gpt()
    idx = prompt()
    greedy = generate(model, idx, max_new_tokens=12, temperature=0)
    for options in ({"top_k": 1}, {"top_p": 1e-6}):
        sampled = generate(model, idx, max_new_tokens=12, temperature=1.5,
                           generator=torch.Generator().manual_seed(3), **options)
        assert torch.equal(sampled, greedy), options


def test_seeded_sampling_is_reproducible_and_seed_dependent() -> None:
    model = tiny_gpt()
    idx = prompt()

    def sample(seed: int) -> torch.Tensor:
        return generate(model, idx, max_new_tokens=20, temperature=1.0, top_k=20, top_p=0.9,
                        generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))


def test_filter_logits_top_k_and_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]]))
    kept = lambda filtered: (filtered > float("-inf")).tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [[True, True, False], [False, True, True]]
    assert kept(filter_logits(logits, top_p=0.6)) == [[True, True, False], [False, True, True]]
    assert kept(filter_logits(logits, top_p=0.5)) == [[True, False, False], [False, False, True]]
    assert kept(filter_logits(logits, top_p=1.0)) == [[True] * 3] * 2
    assert torch.allclose(filter_logits(logits, temperature=2.0), logits / 2)


def test_eot_finishes_a_row_and_stops_when_all_rows_finish() -> None:
    model = tiny_gpt()
    idx = prompt(batch=3, seed=4)
    greedy = generate(model, idx, max_new_tokens=10, temperature=0)
    eot = int(greedy[0, 5])  # row 0 finishes at once; the others when (if) they first emit it
    finish = [row.index(eot) if eot in row else None for row in greedy[:, 5:].tolist()]
    assert finish[0] == 0 and any(f != 0 for f in finish), "pick a prompt whose rows diverge"
    out = generate(model, idx, max_new_tokens=10, temperature=0, eot_id=eot)
    length = 15 if None in finish else 5 + max(finish) + 1
    assert out.shape == (3, length)
    for row, end in enumerate(finish):
        end = length if end is None else 5 + end + 1
        assert torch.equal(out[row, :end], greedy[row, :end])
        assert (out[row, end:] == eot).all()
    single = generate(model, idx[:1], max_new_tokens=10, temperature=0, eot_id=eot)
    assert single.shape == (1, 6)  # the only row finished: generation stopped early


def test_on_token_streams_every_new_column() -> None:
    model = tiny_gpt()
    seen: list[torch.Tensor] = []
    out = generate(model, prompt(), max_new_tokens=6, temperature=0,
                   on_token=lambda tokens: seen.append(tokens.clone()))
    assert torch.equal(torch.stack(seen, dim=1), out[:, 5:])


def test_long_prompt_is_cropped_to_the_context_with_a_warning() -> None:
    model = tiny_gpt()
    long = prompt(batch=1, length=CONTEXT + 7)
    with pytest.warns(UserWarning, match="exceeds the context"):
        out = generate(model, long, max_new_tokens=4, temperature=0)
    assert out.shape == (1, CONTEXT + 11) and torch.equal(out[:, :CONTEXT + 7], long)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tail = generate(model, long[:, -CONTEXT:], max_new_tokens=4, temperature=0)
    assert torch.equal(out[:, -4:], tail[:, -4:])


@pytest.mark.parametrize("bad", [{"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5},
                                 {"max_new_tokens": -1}])
def test_meaningless_settings_are_rejected(bad: dict) -> None:
    settings = {"max_new_tokens": 2, **bad}
    with pytest.raises(ConfigError, match=next(iter(bad))):
        generate(tiny_gpt(), prompt(), **settings)


def test_empty_prompt_is_rejected_and_the_model_is_left_as_it_was() -> None:
    model = tiny_gpt().train()
    with pytest.raises(ConfigError, match="non-empty prompt"):
        generate(model, torch.zeros(1, 0, dtype=torch.long))
    generate(model, prompt(), max_new_tokens=2)
    assert model.training
    assert not any("forward" in vars(module) for module in model.modules())  # fast CPU layout undone
