"""The GPT: shapes, loss, causality, KV cache, weight tying, init, optimizer groups, learning."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from llm import kernels
from llm.checkpoint import MODEL_FORMAT_VERSION, load_model_file, save_model_file
from llm.config import ModelConfig
from llm.errors import ConfigError
from llm.kernels import eager_cpu, linear_cross_entropy, qkv_heads
from llm.model import GPT, Decoder, RMSNorm, rope_table, swiglu_hidden
from llm.optim import make_optimizer

FIXTURES = Path(__file__).parent / "fixtures"
POSITIONS = ("learned", "sinusoidal", "rope")
VARIANTS = [(p, n, a) for p in POSITIONS for n, a in (("rmsnorm", "relu2"), ("layernorm", "gelu"))] + [
    ("rope", "rmsnorm", "swiglu")]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> ModelConfig:
    """A small config that runs in milliseconds."""
    base = dict(vocab_size=97, d_model=32, num_heads=4, num_layers=2, d_ff=64, max_seq_length=24, dropout=0.0)
    return ModelConfig(**{**base, **overrides})


def make_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(**overrides)).eval()


def test_logits_without_targets_and_a_scalar_loss_with_them():
    model = make_model()
    idx = torch.randint(0, 97, (3, 24))
    assert model(idx).shape == (3, 24, 97)
    loss = model(idx[:, :5], idx[:, 1:6])
    assert loss.shape == ()


def test_untrained_loss_is_near_ln_vocab():
    model = make_model(vocab_size=1000)
    idx = torch.randint(0, 1000, (4, 24))
    loss = model(idx, torch.randint(0, 1000, (4, 24)))
    assert abs(loss.item() - math.log(1000)) < 0.1


def test_loss_ignores_minus_one_targets():
    model = make_model()
    idx = torch.randint(0, 97, (2, 10))
    targets = torch.randint(0, 97, (2, 10))
    logits = model(idx)
    targets[0, 3:] = -1
    loss = model(idx, targets)
    keep = targets != -1
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(loss, expected, atol=1e-6)
    # the ignored positions really were left out of the mean
    all_kept = torch.nn.functional.cross_entropy(logits.view(-1, 97), targets.clamp(min=0).view(-1))
    assert not torch.allclose(loss, all_kept)


@pytest.mark.parametrize("position,norm,activation", VARIANTS)
def test_causality(position, norm, activation):
    model = make_model(position=position, norm=norm, activation=activation)
    idx = torch.randint(0, 97, (2, 20))
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 97
    before = model(idx)
    after = model(changed)
    assert torch.allclose(before[:, :12], after[:, :12], atol=1e-6)
    assert not torch.allclose(before[:, 12:], after[:, 12:], atol=1e-4)


@pytest.mark.parametrize("position,norm,activation", VARIANTS)
def test_kv_cache_matches_full_forward(position, norm, activation):
    model = make_model(position=position, norm=norm, activation=activation)
    idx = torch.randint(0, 97, (2, 24))
    full = model(idx)  # with autograd: the training path
    cache = model.new_kv_cache(batch_size=2)
    with torch.inference_mode():  # as generate() decodes: the no-autograd paths of RoPE and ReLU^2
        pieces = [model(idx[:, :7], kv_cache=cache), model(idx[:, 7:11], kv_cache=cache)]  # prefill + chunk
        pieces += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(11, 24)]
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    cache.reset()
    assert cache.length == 0
    torch.testing.assert_close(model(idx[:, :3], kv_cache=cache), full[:, :3], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position,norm,activation", VARIANTS)
@pytest.mark.parametrize("bias", [False, True])
def test_the_decoder_gives_the_full_forwards_logits_one_token_at_a_time(position, norm, activation, bias):
    """Decoder, generation's lean single-token path, predicts what the full forward does at each
    position, after a prefill through forward, for every architecture variant; its in-place residual
    adds leave the weights as they were."""
    model = make_model(position=position, norm=norm, activation=activation, bias=bias)
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    idx = torch.randint(0, 97, (2, 24))
    full = model(idx)
    cache = model.new_kv_cache(batch_size=2)
    decoder = Decoder(model, cache)
    with torch.inference_mode():
        pieces = [model(idx[:, :5], kv_cache=cache)]
        pieces += [decoder(idx[:, t])[:, None] for t in range(5, 24)]
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(tensor, weights[name]) for name, tensor in model.state_dict().items())


def test_the_decoder_refuses_what_forward_refuses():
    model = make_model()
    cache = model.new_kv_cache(batch_size=1, max_len=8)
    with torch.inference_mode():
        model(torch.zeros(1, 8, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="overflow"):
            Decoder(model, cache)(torch.zeros(1, dtype=torch.long))
        with pytest.raises(ValueError, match="batch size"):
            Decoder(model, cache)(torch.zeros(2, dtype=torch.long))
        cache = model.new_kv_cache(batch_size=1)
        cache.length = 24  # a cache as long as the context: position 24 has no RoPE angle or embedding
        with pytest.raises(ValueError, match="max_seq_length"):
            Decoder(model, cache)(torch.zeros(1, dtype=torch.long))


def test_kv_cache_overflow_and_too_long_input_raise():
    model = make_model()
    cache = model.new_kv_cache(batch_size=1, max_len=8)
    model(torch.zeros(1, 6, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="max_seq_length"):
        model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match="batch size"):
        model(torch.zeros(2, 1, dtype=torch.long), kv_cache=cache)


def test_tie_weights_shares_storage_and_untied_does_not():
    tied = make_model(tie_weights=True)
    assert tied.lm_head.weight.data_ptr() == tied.token_embedding.weight.data_ptr()
    untied = make_model(tie_weights=False)
    assert untied.lm_head.weight.data_ptr() != untied.token_embedding.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == 97 * 32


def test_bias_false_has_no_bias_params_and_true_has_them():
    names = [n for n, _ in make_model(bias=False, norm="layernorm").named_parameters()]
    assert not [n for n in names if n.endswith("bias")]
    names = [n for n, _ in make_model(bias=True, norm="layernorm").named_parameters()]
    per_block = 4 + 2  # qkv, proj, up, down, two norms
    assert len([n for n in names if n.endswith("bias")]) == 2 * per_block + 1  # + final norm


def test_num_params_matches_hand_count():
    V, C, L, F, T = 97, 32, 2, 64, 24
    model = make_model(position="learned", norm="layernorm", activation="gelu", bias=True, tie_weights=False)
    per_block = (C * 3 * C + 3 * C) + (C * C + C) + (C * F + F) + (F * C + C) + 2 * (2 * C)
    hand = V * C + T * C + L * per_block + 2 * C + C * V
    assert model.num_params() == hand
    assert model.num_params(non_embedding=True) == hand - V * C - T * C
    default = make_model()  # rope, rmsnorm, relu2, tied, no bias
    hand_default = V * C + L * (4 * C * C + 2 * C * F + 2 * C) + C
    assert default.num_params() == hand_default == default.num_params(non_embedding=True)
    assert default.flops_per_token() == 6 * hand_default + 12 * L * C * T


def test_swiglu_keeps_param_count_comparable():
    relu2 = make_model(activation="relu2", d_model=64, d_ff=256)
    swiglu = make_model(activation="swiglu", d_model=64, d_ff=256)
    assert swiglu_hidden(256) == 176
    assert abs(swiglu.num_params() - relu2.num_params()) / relu2.num_params() < 0.05


def test_gpt2_init_scales_residual_projections():
    model = make_model(d_model=256, d_ff=1024, num_layers=8, num_heads=4)
    expected = 0.02 / math.sqrt(2 * 8)
    for block in model.blocks:
        assert block.attn.proj.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert block.mlp.down.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_optimizer_groups_cover_every_param_once():
    model = make_model(bias=True, norm="layernorm", position="learned", tie_weights=True)
    decay, no_decay = model.optimizer_groups(weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device="cpu")
    assert isinstance(optimizer, torch.optim.AdamW)


@pytest.mark.parametrize("optimizer_name", ["adamw", "muon"])
@pytest.mark.parametrize("position,norm,activation", VARIANTS)
def test_training_on_a_repeated_sequence_reduces_loss(position, norm, activation, optimizer_name):
    model = make_model(position=position, norm=norm, activation=activation).train()
    optimizer = make_optimizer(model, lr=3e-3, weight_decay=0.0, betas=(0.9, 0.95), device="cpu",
                               optimizer=optimizer_name, muon_lr=0.02)
    pattern = torch.arange(25) % 7
    idx, targets = pattern[:-1].repeat(4, 1), pattern[1:].repeat(4, 1)
    losses = []
    for _ in range(30):
        loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_dropout_is_active_in_train_mode_only():
    model = make_model(dropout=0.5)
    idx = torch.randint(0, 97, (2, 10))
    torch.testing.assert_close(model(idx), model(idx))
    model.train()
    assert not torch.allclose(model(idx), model(idx))


def test_bf16_autocast_forward_runs_and_stays_close():
    model = make_model()
    idx = torch.randint(0, 97, (2, 16))
    loss32 = model(idx, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = model(idx, idx)
    assert loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)


def test_a_bf16_kv_cache_serves_an_fp32_model():
    model = make_model().eval()
    idx = torch.randint(0, 97, (1, 12))
    cache = model.new_kv_cache(batch_size=1, dtype=torch.bfloat16)  # half the memory; keys cast back to fp32
    with torch.inference_mode():
        full = model(idx)
        pieces = [model(idx[:, :5], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache)
                                                        for t in range(5, 9)]
        pieces += [Decoder(model, cache)(idx[:, t])[:, None] for t in range(9, 12)]
    torch.testing.assert_close(torch.cat(pieces, dim=1).float(), full.float(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("overrides,key", [
    ({"num_heads": 5}, "model.num_heads"),
    ({"d_model": 36, "num_heads": 4, "position": "rope"}, "model.position"),  # odd head size
    ({"norm": "batchnorm"}, "model.norm"),
])
def test_bad_config_raises_config_error(overrides, key):
    with pytest.raises(ConfigError, match=key):
        GPT(dataclasses.replace(tiny(), **overrides))


def test_fast_rmsnorm_matches_torch_and_its_gradients_are_exact():
    norm = RMSNorm(16, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 5, 16, requires_grad=True)
    reference = torch.nn.functional.rms_norm(x, (16,), norm.weight, 1e-5)
    torch.testing.assert_close(norm(x), reference, atol=1e-5, rtol=1e-5)
    norm64 = norm.double()
    x64 = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(norm64, (x64,))


def test_rope_turns_adjacent_pairs_by_position_and_the_fast_projection_matches_the_plain_one():
    """RoPE turns each pair (x[2i], x[2i + 1]) by position * theta_i (RoFormer, eq. 34); the CPU fast path
    (one autograd function for the QKV projection and both rotations, in place) gives the plain ops'
    values and exact gradients, with and without autograd, and in bf16 what the plain ops give to bf16
    rounding."""
    torch.manual_seed(0)
    rope = rope_table(6, 8)
    theta = 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    angle = torch.arange(6, dtype=torch.float64)[:, None, None] * theta  # (T, 1, D/2)
    cos, sin = rope.double().unbind(-1)  # the table's fp32 values, which the rotations below use
    torch.testing.assert_close(cos, angle.cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, angle.sin(), atol=1e-6, rtol=0)
    x = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)  # (B, T, C), H = 2 heads of 8
    weight = torch.randn(48, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(48, dtype=torch.float64, requires_grad=True)
    fast = qkv_heads(x, weight, bias, 2, rope)
    q, k, v = torch.nn.functional.linear(x, weight, bias).detach().view(2, 6, 3, 2, 8).unbind(2)
    for plain, rotated in ((q, fast[0]), (k, fast[1])):
        even, odd = plain[..., 0::2], plain[..., 1::2]
        turned = (even * cos - odd * sin, odd * cos + even * sin)
        by_hand = torch.stack(turned, dim=-1).flatten(-2)
        torch.testing.assert_close(rotated, by_hand)
        torch.testing.assert_close(rotated, kernels.rotate(plain, cos, sin))  # the plain path
    torch.testing.assert_close(fast[2], v)
    with torch.no_grad():  # generation's path: no autograd function
        without_autograd = qkv_heads(x, weight, bias, 2, rope)
        torch.testing.assert_close(torch.stack(without_autograd), torch.stack(fast).detach())
    assert torch.autograd.gradcheck(lambda *t: qkv_heads(*t, 2, rope), (x, weight, bias))
    assert torch.autograd.gradcheck(lambda *t: qkv_heads(*t, None, 2, rope), (x, weight))
    low = [t.detach().bfloat16().requires_grad_() for t in (x, weight, bias)]  # a model cast to bf16
    low_fast = qkv_heads(*low, 2, rope)
    assert all(t.dtype == torch.bfloat16 for t in low_fast)
    torch.testing.assert_close(torch.stack(low_fast).double(), torch.stack(fast).detach(), atol=0.2,
                               rtol=0.02)
    torch.autograd.backward(low_fast, [torch.ones_like(t) for t in low_fast])
    plain_grads = torch.autograd.grad(sum(t.sum() for t in fast), (x, weight, bias))
    for low_input, plain_grad in zip(low, plain_grads):
        torch.testing.assert_close(low_input.grad.double(), plain_grad, atol=0.5, rtol=0.02)
    assert [t.shape for t in qkv_heads(x, weight, bias, 2, None)] == [(2, 6, 2, 8)] * 3


def test_the_fast_rope_projection_under_cpu_autocast_gives_autocasts_own_bits():
    """Under bf16 autocast the fused function runs its matmuls in bf16 as autocast's linear would, and
    rotates in fp32: outputs and fp32 gradients are bit-identical to autocast's linear + that rotation."""
    torch.manual_seed(0)
    rope = rope_table(5, 8)
    inputs = [torch.randn(3, 5, 16, requires_grad=True), torch.randn(48, 16, requires_grad=True),
              torch.randn(48, requires_grad=True)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = qkv_heads(*inputs, 2, rope)
        q, k, v = torch.nn.functional.linear(*inputs).view(3, 5, 3, 2, 8).unbind(2)
    turn = torch.view_as_complex(rope)  # (T, 1, D/2)
    plain = [torch.view_as_real(torch.view_as_complex(t.float().unflatten(-1, (-1, 2))) * turn).flatten(-2)
             .bfloat16() for t in (q, k)] + [v]  # the rotation in fp32, as torch has no bf16 complex
    for ours, theirs in zip(fast, plain):
        assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs)
    grads = [torch.randn_like(t) for t in plain]
    fast_grads = torch.autograd.grad(fast, inputs, grads)
    for ours, theirs in zip(fast_grads, torch.autograd.grad(plain, inputs, grads)):
        assert ours.dtype == torch.float32 and torch.equal(ours, theirs)


def test_rotate_pairs_turns_in_place_in_every_layout_and_precision():
    """rotate_pairs_ writes the turned pairs into x itself: through a complex view of its memory when the
    layout allows, and through a copy back when it does not (an odd offset, bf16)."""
    torch.manual_seed(0)
    turn = torch.polar(torch.ones(4), torch.rand(4) * 6.3)  # (D/2,) = (4,): unit complex numbers
    def by_hand(x: torch.Tensor) -> torch.Tensor:
        even, odd = x[..., 0::2].double(), x[..., 1::2].double()
        cos, sin = turn.real.double(), turn.imag.double()
        return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    base = torch.randn(3, 18)
    for x in (base[:, :8], base[:, 1:9], base.bfloat16()[:, :8]):  # even strides, odd offset, bf16
        expected = by_hand(x)
        kernels.rotate_pairs_(x, turn)
        tolerance = 1e-6 if x.dtype == torch.float32 else 2e-2
        torch.testing.assert_close(x.double(), expected, atol=tolerance, rtol=tolerance)


def test_a_format_1_rope_model_file_loads_with_the_same_outputs(tmp_path: Path):
    """Format 1 turned the pairs (x[i], x[i + D/2]); loading reorders the QKV rows, so a model saved then
    (tests/fixtures/rope_format_v1.pt, with its logits, written by that code) predicts what it did."""
    model, payload = load_model_file(FIXTURES / "rope_format_v1.pt")
    assert payload["format_version"] == MODEL_FORMAT_VERSION == 2 and model.config.bias
    with torch.no_grad():
        logits = model(payload["input_ids"])
    torch.testing.assert_close(logits, payload["expected_logits"], atol=1e-5, rtol=1e-5)
    save_model_file(tmp_path / "again.pt", model, model.config, payload["tokenizer_sha256"])
    again, _ = load_model_file(tmp_path / "again.pt")  # format 2 is read as it is: no second reordering
    with torch.no_grad():
        torch.testing.assert_close(again(payload["input_ids"]), logits)


def test_relu2_gradients_are_exact():
    mlp = make_model(activation="relu2").double().blocks[0].mlp
    h = torch.randn(1, 2, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mlp, (h,))


def test_compiled_model_takes_plain_ops_and_matches_eager():
    """Under torch.compile the hand-written CPU autograd functions step aside (inductor fuses plain ops
    better); the compiled forward and backward agree with eager."""
    assert torch.compile(lambda x: x + eager_cpu(x))(torch.zeros(1)).item() == 0.0
    assert eager_cpu(torch.zeros(1))
    model = make_model(position="rope", norm="rmsnorm", activation="relu2")
    idx = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model)
    losses, grads = [], []
    for net in (model, compiled):
        model.zero_grad(set_to_none=True)
        loss = net(idx[:, :-1], idx[:, 1:])
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for compiled_grad, eager_grad in zip(grads[1], grads[0]):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_output_loss_gives_the_plain_loss_and_gradients(precision):
    """Training on CPU fuses the output layer and loss in row chunks (no (N, V) logits): the same loss and
    gradients as logits + F.cross_entropy, including ignored (-1) targets and a short last chunk; under
    bf16 autocast both run their matmuls in bf16 (gradients then agree to bf16's rounding)."""
    torch.manual_seed(0)
    x = torch.randn(750, 32, requires_grad=True)
    weight = (0.1 * torch.randn(1024, 32)).requires_grad_()
    targets = torch.randint(0, 1024, (750,))
    targets[:7] = -1  # e.g. padding
    results = []
    for fused in (False, True):
        x.grad = weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            if fused:
                loss = linear_cross_entropy(x, weight, targets)
                assert type(loss.grad_fn).__name__ == "_LinearCrossEntropyFunctionBackward"  # no logits
            else:
                loss = torch.nn.functional.cross_entropy(x @ weight.t(), targets, ignore_index=-1)
        loss.mul(3.0).backward()  # an upstream gradient other than 1 (as GradScaler gives)
        results.append((loss.detach(), x.grad.clone(), weight.grad.clone()))
    (plain_loss, *plain_grads), (fused_loss, *fused_grads) = results
    assert fused_loss.dtype == plain_loss.dtype == torch.float32
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-6)
    for fused, plain in zip(fused_grads, plain_grads):
        if precision == "fp32":
            torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-7)
        else:  # within 2% of the largest gradient
            torch.testing.assert_close(fused, plain, rtol=0, atol=2e-2 * plain.abs().max().item())
    with torch.no_grad():  # evaluation takes the plain path and gives the same number
        assert linear_cross_entropy(x, weight, targets).item() == pytest.approx(
            torch.nn.functional.cross_entropy(x @ weight.t(), targets, ignore_index=-1).item(), rel=1e-6)


def test_bf16_attention_backward_matches_torch_and_is_exact_in_float64():
    """Causal attention in bf16 on CPU recomputes its weights in backward (kernels.attention): the gradients
    are exact in float64 (gradcheck) and agree with torch's flash backward in bf16 to bf16's rounding."""
    q, k, v = (torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(kernels._CausalAttentionFunction.apply, (q, k, v))
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(3, 2, 4, 40, 16, generator=generator).bfloat16().requires_grad_()  # 3 x (B, H, T, D)
    upstream = torch.randn(2, 4, 40, 16, generator=generator).bfloat16()
    grads, paths = [], []
    for attend in (kernels.attention, torch.nn.functional.scaled_dot_product_attention):
        qkv.grad = None
        out = attend(*qkv, None, 0.0, True) if attend is kernels.attention else attend(*qkv, is_causal=True)
        out.backward(upstream)
        grads.append(qkv.grad.float())
        paths.append(type(out.grad_fn).__name__)
    assert paths[0] == "_CausalAttentionFunctionBackward" != paths[1]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=2e-2 * grads[1].abs().max().item())
