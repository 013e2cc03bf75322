"""Optimizers: Newton-Schulz orthogonalization, Muon's per-block updates, its AdamW half, and learning."""

from __future__ import annotations

import pytest
import torch

from llm.config import ModelConfig
from llm.model import GPT
from llm.optim import Muon, make_optimizer, orthogonalize


def tiny_model(**overrides) -> GPT:
    base = dict(vocab_size=97, d_model=32, num_heads=4, num_layers=2, d_ff=64, max_seq_length=24, dropout=0.0)
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**base, **overrides}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: what GPUs run
@pytest.mark.parametrize("shape", [(48, 48), (32, 96), (96, 32), (3, 16, 40)])
def test_orthogonalize_pushes_every_singular_value_near_one(shape, dtype):
    generator = torch.Generator().manual_seed(0)
    *batch, rows, cols = shape
    rank = min(rows, cols)
    left = torch.linalg.qr(torch.randn(*batch, rows, rank, generator=generator))[0]
    right = torch.linalg.qr(torch.randn(*batch, cols, rank, generator=generator))[0]
    spectrum = torch.logspace(-1.5, 0, rank) * 1e-3  # singular values spread over ~30x
    update = left @ torch.diag_embed(spectrum.expand(*batch, rank)) @ right.mT
    result = orthogonalize(update, dtype=dtype)
    singular = torch.linalg.svdvals(result)
    assert result.shape == update.shape
    assert singular.min() > 0.5 and singular.max() < 1.25  # Jordan et al.: roughly 0.7-1.2
    # the singular vectors are kept: result ~ left @ diag(near 1) @ right^T
    aligned = torch.diagonal(left.mT @ result @ right, dim1=-2, dim2=-1)
    assert aligned.min() > 0.5


def test_muon_groups_cover_every_param_once_and_stack_fused_matrices():
    model = tiny_model(activation="swiglu", bias=True)
    groups = model.optimizer_groups(weight_decay=0.1, muon=True)
    params = [p for group in groups for p in group["params"]]
    assert len({id(p) for p in params}) == len(params) == len(list(model.parameters()))
    blocks = {id(p): group["blocks"] for group in groups if group.get("use_muon") for p in group["params"]}
    for block in model.blocks:
        assert blocks[id(block.attn.qkv.weight)] == 3 and blocks[id(block.mlp.up.weight)] == 2
        assert blocks[id(block.attn.proj.weight)] == blocks[id(block.mlp.down.weight)] == 1
    assert id(model.token_embedding.weight) not in blocks  # embeddings and the output layer stay on AdamW
    assert all(p.dim() == 2 for group in groups if group.get("use_muon") for p in group["params"])


def test_muon_orthogonalizes_each_block_of_a_fused_weight_on_its_own():
    weight = torch.nn.Parameter(torch.zeros(3 * 16, 16))
    optimizer = Muon([{"params": [weight], "use_muon": True, "blocks": 3}], lr=1.0, betas=(0.9, 0.95),
                     momentum=0.0)
    scales = torch.tensor([1.0, 100.0, 0.01]).repeat_interleave(16)[:, None]  # blocks of very unequal size
    weight.grad = torch.randn(48, 16, generator=torch.Generator().manual_seed(1)) * scales
    optimizer.step()
    update = -weight.detach() / (0.2 * 16 ** 0.5)
    for block in update.view(3, 16, 16):  # orthogonalizing the (48, 16) whole would shrink the small blocks
        singular = torch.linalg.svdvals(block)
        assert singular.min() > 0.5 and singular.max() < 1.25


def test_muon_updates_its_adamw_groups_exactly_as_torch_adamw():
    generator = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3, generator=generator)), torch.nn.Parameter(torch.randn(3))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    muon = Muon([{"params": [ours[0]], "weight_decay": 0.1}, {"params": [ours[1]]}], lr=1e-2,
                betas=(0.9, 0.95))
    adamw = torch.optim.AdamW([{"params": [theirs[0]], "weight_decay": 0.1},
                               {"params": [theirs[1]], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95))
    for _ in range(4):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        muon.step()
        adamw.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_make_optimizer_records_each_groups_peak_rate():
    """(That Muon trains: tests/test_model.py, test_training_on_a_repeated_sequence_reduces_loss.)"""
    optimizer = make_optimizer(tiny_model(), lr=3e-3, weight_decay=0.0, betas=(0.9, 0.95), device="cpu",
                               optimizer="muon", muon_lr=0.02)
    assert {g["peak_lr"] for g in optimizer.param_groups if g.get("use_muon")} == {0.02}
    assert {g["peak_lr"] for g in optimizer.param_groups if not g.get("use_muon")} == {3e-3}


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        make_optimizer(tiny_model(), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), device="cpu",
                       optimizer="sgd")
