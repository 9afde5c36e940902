"""The batched Riemannian step (shape groups stacked into bmm, one factorisation per rank) equals a
straightforward per-pair step: one inverse per pair in a plain loop, fed to torch's reference AdamW."""

import pytest
import torch
from torch import nn

from lorakit.optim import PairPreconditioner, RiemannianAdamW

# (r, in, out): three pairs of one shape (stacked), other widths, another rank, a pair alone
SHAPES = [(3, 7, 5), (3, 7, 5), (3, 7, 5), (3, 11, 4), (4, 8, 9), (4, 8, 9), (4, 6, 6), (2, 13, 4)]
SINGULAR = 1  # B = 0 and δ = 0: BᵀB is singular, so this A takes its plain gradient
FROZEN_A = 5  # A frozen (requires_grad False, no gradient): only its B trains
FROZEN_BOTH = 6  # neither factor trains: no g̃, no optimizer state


def make_pairs(dtype=torch.float64) -> list[tuple[nn.Parameter, nn.Parameter]]:
    g = torch.Generator().manual_seed(0)
    pairs = []
    for k, (r, n_in, n_out) in enumerate(SHAPES):
        A = nn.Parameter(torch.randn(r, n_in, generator=g, dtype=torch.float64).to(dtype))
        B = nn.Parameter((torch.zeros(n_out, r, dtype=torch.float64) if k == SINGULAR
                          else torch.randn(n_out, r, generator=g, dtype=torch.float64) * 10.0 ** -(k % 3)).to(dtype))
        A.requires_grad_(k not in (FROZEN_A, FROZEN_BOTH))
        B.requires_grad_(k != FROZEN_BOTH)
        pairs.append((A, B))
    return pairs


def set_grads(pairs, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for A, B in pairs:
        for p in (A, B):
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) if p.requires_grad else None


def reference_gradient(A: torch.Tensor, B: torch.Tensor, side: int, grad: torch.Tensor, damping: float) -> torch.Tensor:
    """One pair, float64: (BᵀB + δI)⁻¹∇_A or ∇_B(AAᵀ + δI)⁻¹; the plain gradient where the Gram is singular."""
    A, B, grad = A.double(), B.double(), grad.double()
    gram = B.T @ B if side == 0 else A @ A.T
    gram = gram + damping * torch.eye(gram.shape[0], dtype=torch.float64)
    if torch.linalg.matrix_rank(gram) < gram.shape[0]:
        return grad
    P = torch.linalg.inv(gram)
    return P @ grad if side == 0 else grad @ P


def test_batched_gradients_equal_the_per_pair_loop_float64():
    pairs = make_pairs()
    set_grads(pairs, seed=1)
    got = {id(p): g for p, g in PairPreconditioner(pairs, damping=0.0).preconditioned_gradients()}
    trained = [p for pair in pairs for p in pair if p.requires_grad]
    assert set(got) == {id(p) for p in trained}  # frozen factors get nothing
    for k, (A, B) in enumerate(pairs):
        for side, p in enumerate((A, B)):
            if p.grad is None:
                continue
            expected = reference_gradient(A.detach(), B.detach(), side, p.grad, 0.0)
            assert got[id(p)].dtype == p.dtype and got[id(p)].shape == p.shape
            torch.testing.assert_close(got[id(p)], expected, rtol=1e-12, atol=1e-12, msg=f"pair {k}, side {side}")
    assert torch.equal(got[id(pairs[SINGULAR][0])], pairs[SINGULAR][0].grad)  # the identity fallback, exactly


def test_batched_adamw_steps_equal_per_pair_reference_steps_float64():
    """Two RiemannianAdamW steps (fused path) against torch's single-tensor AdamW fed the per-pair g̃."""
    damping, lr, betas, wd = 0.0, 0.01, (0.8, 0.95), 0.1
    pairs = make_pairs()
    shadow = [(nn.Parameter(A.detach().clone()), nn.Parameter(B.detach().clone())) for A, B in pairs]
    trained = [p for pair in pairs for p in pair if p.requires_grad]
    shadow_trained = [s for pair, spair in zip(pairs, shadow) for p, s in zip(pair, spair) if p.requires_grad]
    opt = RiemannianAdamW(trained, pairs=pairs, damping=damping, lr=lr, betas=betas, weight_decay=wd)
    ref = torch.optim.AdamW(shadow_trained, lr=lr, betas=betas, weight_decay=wd, foreach=False, fused=False)
    for step in (1, 2):
        set_grads(pairs, seed=10 + step)
        raw = {id(p): p.grad.clone() for p in trained}
        for (A, B), (sA, sB) in zip(pairs, shadow):
            for side, (p, s) in enumerate(((A, sA), (B, sB))):
                if p.requires_grad:
                    s.grad = reference_gradient(sA.detach(), sB.detach(), side, p.grad, damping)
        opt.step()
        ref.step()
        for p, s in zip(trained, shadow_trained):
            torch.testing.assert_close(p.detach(), s.detach(), rtol=1e-12, atol=1e-12, msg=f"step {step}")
            assert torch.equal(p.grad, raw[id(p)])  # the raw gradient is restored after the step
    frozen = [p for pair in pairs for p in pair if not p.requires_grad]
    assert frozen and all(p.grad is None and p not in opt.state for p in frozen)
    assert all(torch.equal(p, s) for pair, spair in zip(pairs, shadow) for p, s in zip(pair, spair) if not p.requires_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_precision_factors_compute_in_float32(dtype):
    """bf16 / fp32 factors: g̃ in the factor's dtype, computed in fp32 (within the dtype's rounding of the
    float64 per-pair result)."""
    pairs = make_pairs(dtype)
    set_grads(pairs, seed=3)
    got = {id(p): g for p, g in PairPreconditioner(pairs, damping=1e-6).preconditioned_gradients()}
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for A, B in pairs:
        for side, p in enumerate((A, B)):
            if p.grad is None:
                continue
            expected = reference_gradient(A.detach(), B.detach(), side, p.grad, 1e-6)
            assert got[id(p)].dtype == dtype
            scale = expected.abs().max().item()
            torch.testing.assert_close(got[id(p)].double() / scale, expected / scale, rtol=0, atol=tol)
