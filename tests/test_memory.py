"""The memory check of a training run: an exact parameter count, and a lower bound that refuses only what
cannot fit."""

from __future__ import annotations

import itertools

import pytest
import torch

from llm.config import ModelConfig, TrainConfig
from llm.errors import ConfigError
from llm.memory import check_training_fits, estimate_training, parameter_counts
from llm.model import GPT

KNOBS = list(itertools.product(("learned", "sinusoidal", "rope"), ("layernorm", "rmsnorm"),
                               ("gelu", "swiglu", "relu2"), (True, False), (True, False)))


@pytest.mark.parametrize(("position", "norm", "activation", "tie_weights", "bias"), KNOBS)
def test_parameter_count_is_the_models(position: str, norm: str, activation: str, tie_weights: bool,
                                       bias: bool) -> None:
    config = ModelConfig(vocab_size=50, d_model=16, num_heads=2, num_layers=3, d_ff=40, max_seq_length=8,
                         position=position, norm=norm, activation=activation, tie_weights=tie_weights,
                         bias=bias)
    model = GPT(config)
    hidden = sum(p.numel() for p in model.hidden_matrices())
    assert parameter_counts(config) == (model.num_params(), hidden)


def test_estimate_counts_weights_gradients_optimizer_and_activations() -> None:
    config = ModelConfig(vocab_size=10_000)  # the defaults: 24.0M parameters, 18.9M in hidden matrices
    parameters, hidden = parameter_counts(config)
    adamw = estimate_training(config, TrainConfig(optimizer="adamw"))
    muon = estimate_training(config, TrainConfig(optimizer="muon"))
    assert adamw.weights == adamw.gradients == 4 * parameters
    assert adamw.optimizer == 8 * parameters and muon.optimizer == 8 * parameters - 4 * hidden
    # 32 x 512 tokens x 6 layers x (8 x 512 + 2 x 2048) values of 4 bytes; half under autocast
    assert adamw.activations == 32 * 512 * 6 * (8 * 512 + 2 * 2048) * 4
    assert estimate_training(config, TrainConfig(), precision="bf16").activations == adamw.activations // 2
    accumulated = estimate_training(config, TrainConfig(grad_accum_steps=4), world=2)
    assert accumulated.activations == adamw.activations // 8


def test_the_defaults_fit_in_a_few_gib_and_absurd_sizes_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("llm.memory.device_memory", lambda device: 8 << 30)
    cpu = torch.device("cpu")
    check_training_fits(ModelConfig(vocab_size=10_000), TrainConfig(), cpu)
    huge = ModelConfig(vocab_size=10_000, d_model=8192, num_heads=64, num_layers=64, d_ff=32768)
    expected = (r"51,622,584,320 parameters\) trained with train.batch_size 32 needs at least 1,089.2 GiB "
                r"\(weights 192.3 GiB.* but the cpu has 8.0 GiB")
    with pytest.raises(ConfigError, match=expected):
        check_training_fits(huge, TrainConfig(), cpu)


def test_processes_sharing_one_machine_share_its_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    config = ModelConfig(vocab_size=10_000)
    one = estimate_training(config, TrainConfig(), world=8).total
    monkeypatch.setattr("llm.memory.device_memory", lambda device: 4 * one)
    check_training_fits(config, TrainConfig(), torch.device("cpu"), world=8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(ConfigError, match="x 8 processes"):
        check_training_fits(config, TrainConfig(), torch.device("cpu"), world=8)
