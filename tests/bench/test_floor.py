"""bench/floor.py's FLOP count, the floor of its step ÷ floor ratios: every GEMM the fused node runs is counted,
the in-place ones (addmm_) included, so its count equals the general path's and the written-out formula."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import floor  # noqa: E402

from lorakit.adapters import ADAPTER_CLASSES, fused  # noqa: E402


def test_an_in_place_gemm_counts_what_its_out_of_place_form_counts():
    a, b, y = torch.randn(6, 4), torch.randn(4, 5), torch.randn(6, 5)
    assert floor.counted_flops(lambda: y.addmm_(a, b, alpha=0.5)) == floor.counted_flops(lambda: torch.addmm(y, a, b)) == 2 * 6 * 4 * 5
    ba, bb, by = torch.randn(3, 6, 4), torch.randn(3, 4, 5), torch.randn(3, 6, 5)
    assert floor.counted_flops(lambda: by.baddbmm_(ba, bb)) == 2 * 3 * 6 * 4 * 5


@pytest.mark.parametrize("structure", ["lora", "lora-fa", "xs"])
def test_the_fused_layers_flops_equal_the_general_paths_and_the_formula(structure):
    T, d_in, d_out, r = 12, 7, 5, 3
    base = nn.Linear(d_in, d_out).requires_grad_(False)
    adapter = ADAPTER_CLASSES[structure](base, rank=r, scale=0.5)
    adapter.set_trainable()
    x = torch.randn(T, d_in, requires_grad=True)
    assert fused.applies(adapter, x)
    fused_count = floor.counted_flops(lambda: adapter(x).sum().backward())
    with mock.patch.object(fused, "applies", lambda adapter, x: False):
        general_count = floor.counted_flops(lambda: adapter(x).sum().backward())
    # y = x Wᵀ + s·h Bᵀ with h = x Aᵀ (xs: h Rᵀ too); backward: ∇x = g W + s·v A with v = g B (xs: v R);
    # ∇B = gᵀh (lora), ∇A = vᵀx (lora), ∇R = vᵀ(x Aᵀ) (xs)
    gemm = {"lora": [(d_in, d_out), (d_in, r), (r, d_out), (d_out, d_in), (d_out, r), (r, d_in), (d_out, r), (d_in, r)],
            "lora-fa": [(d_in, d_out), (d_in, r), (r, d_out), (d_out, d_in), (d_out, r), (r, d_in), (d_out, r)],
            "xs": [(d_in, d_out), (d_in, r), (r, r), (r, d_out), (d_out, d_in), (d_out, r), (r, r), (r, d_in), (r, r)]}
    formula = sum(2 * T * k * n for k, n in gemm[structure])
    assert fused_count == formula, (fused_count, formula)
    if structure == "lora":  # the general path's autograd does the same GEMMs (lora-fa/xs: it also computes
        assert general_count == formula  # gradients autograd cannot skip, so it may count more)


@pytest.mark.parametrize("structure, method", [("lora", "lora"), ("lora-fa", "lora-fa"), ("xs", "lora-xs")])
def test_the_gemm_bound_blocks_do_the_fused_nodes_gemms(structure, method):
    """--gemm-bound's blocks: the adapter's block does exactly the GEMMs the fused node adds to a frozen layer,
    and the frozen block the frozen layer's own two (its forward and input-gradient backward), layer for layer."""
    T, r = 12, 3
    shapes = [(7, 5), (5, 7), (7, 5)]
    node = frozen = 0
    for d_in, d_out in shapes:
        base = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
        adapter = ADAPTER_CLASSES[structure](base, rank=r, scale=0.5)
        adapter.set_trainable()
        x = torch.randn(T, d_in, requires_grad=True)
        assert fused.applies(adapter, x)
        node += floor.counted_flops(lambda: adapter(x).sum().backward())
        frozen += floor.counted_flops(lambda: base(x).sum().backward())
    assert floor.counted_flops(floor.gemm_block(shapes, T, r, floor.FROZEN).step) == frozen
    assert floor.counted_flops(floor.gemm_block(shapes, T, r, method).step) == node - frozen > 0


def test_the_gemm_estimate_adds_the_blocks_and_the_optimizer_to_the_floor_per_repeat():
    def timed(steps, optimizer=None):
        t = floor.Timed(lambda: None, None)
        t.times["cpu"]["step"], t.times["cpu"]["optimizer"] = steps, optimizer or [0.0] * len(steps)
        return t

    variants = {"floor": timed([1.0, 2.0, 1.0]), "lora": timed([1.2, 2.5, 1.1], [0.01, 0.02, 0.01]),
                "lora GEMMs": timed([0.05, 0.2, 0.05]), "frozen GEMMs": timed([0.8, 1.6, 0.9])}
    ratios = floor.gemm_bound_ratios(variants)
    assert ratios["lora: (floor + its GEMMs alone + optimizer) / floor (cpu)"] == pytest.approx(1.06)  # median of 1.06, 1.11, 1.06
    assert ratios["frozen GEMMs / floor step (cpu)"] == pytest.approx(0.8)
