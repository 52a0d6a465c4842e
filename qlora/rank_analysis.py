"""Rank analysis of LoRA factors: what `qlora inspect` computes, as pure functions.

Per adapted layer, the update is ΔW = scaling·B·A with B (out, r) and A (r, in). It has at
most r non-zero singular values, and they are those of a small r×r core: with the thin QR
factorizations B = Q_B R_B and Aᵀ = Q_A R_A,

    ΔW = scaling · Q_B (R_B R_Aᵀ) Q_Aᵀ

and Q_B, Q_A have orthonormal columns, so σ(ΔW) = |scaling|·σ(R_B R_Aᵀ). Only the R factors
are formed (float64, (r, r)); memory is the two factors in float64, never out×in.

* effective rank: Roy & Vetterli's entropy effective rank exp(−Σ pᵢ log pᵢ), pᵢ = σᵢ/Σσ:
  1 for a rank-one update, k for k equal singular values, in between otherwise (0 for an
  all-zero update, e.g. an untrained adapter whose B is still zero);
* threshold rank: how many σᵢ exceed 1% of σ₁ (the directions that matter at that cut);
* subspace similarity (Hu et al. 2021, "LoRA", section 7.2): φ(A₁, A₂, i, j) =
  ‖U₁ⁱᵀ U₂ʲ‖²_F / min(i, j), U the right-singular vectors of A (its top i and j), in [0, 1]:
  1 when one span contains the other, 0 when they are orthogonal, about max(i, j)/in for
  unrelated random subspaces.
"""

from __future__ import annotations

import math

import torch

RANK_RTOL = 0.01  # threshold_rank: σᵢ > 1% of σ₁
SVD_RTOL = 1e-6  # right_singular_vectors divides by σᵢ only while σ_min > 1e-6·σ₁
NORM_ROWS = 512  # rows per float64 chunk when taking ‖W‖_F (16 MB at in 4096)


def delta_singular_values(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """σ of scaling·B·A, descending, float64, through the r×r core (never out×in)."""
    # mode="r": the Q factors are never built either; R is (min(n, r), r).
    r_b = torch.linalg.qr(B.double(), mode="r").R  # B: (out, r) -> R_B (r', r)
    r_a = torch.linalg.qr(A.double().T, mode="r").R  # Aᵀ: (in, r) -> R_A (r'', r)
    return abs(scaling) * torch.linalg.svdvals(r_b @ r_a.T)  # (r', r'') core


def effective_rank(sv: torch.Tensor) -> float:
    """Entropy effective rank (Roy & Vetterli 2007) of a spectrum; 0 when it is all zero."""
    total = sv.double().sum()
    if total <= 0:
        return 0.0
    p = sv.double() / total
    p = p[p > 0]  # 0·log 0 = 0
    return math.exp(-(p * p.log()).sum().item())


def threshold_rank(sv: torch.Tensor, rtol: float = RANK_RTOL) -> int:
    """How many singular values exceed `rtol`·σ₁ (0 for an all-zero spectrum)."""
    if sv.numel() == 0 or sv.max() <= 0:
        return 0
    return int((sv > rtol * sv.max()).sum())


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """φ(A₁, A₂, i, j) for all i ≤ r₁, j ≤ r₂ as an (r₁, r₂) float64 matrix (row i−1, column j−1).

    With V₁, V₂ the right-singular vectors of A₁ (r₁, in), A₂ (r₂, in) as rows (descending σ),
    ‖U₁ⁱᵀ U₂ʲ‖²_F is the sum of M² over the top-left i×j block of M = V₁ V₂ᵀ: a 2-D cumsum.
    """
    if A1.shape[1] != A2.shape[1]:
        raise ValueError(f"A factors of different input widths: {A1.shape[1]} vs {A2.shape[1]}")
    v1, v2 = right_singular_vectors(A1), right_singular_vectors(A2)  # (r₁, in), (r₂, in)
    overlap = (v1 @ v2.T).square().cumsum(0).cumsum(1)  # (r₁, r₂)
    i = torch.arange(1, overlap.shape[0] + 1, dtype=torch.float64)
    j = torch.arange(1, overlap.shape[1] + 1, dtype=torch.float64)
    return overlap / torch.minimum(i[:, None], j[None, :])


def right_singular_vectors(A: torch.Tensor) -> torch.Tensor:
    """The right-singular vectors of a wide A (r, in) as rows, descending σ, float64.

    Through the r×r core again: Aᵀ = Q R gives A = Rᵀ Qᵀ, and with Rᵀ = U Σ Wᵀ the SVD is
    A = U Σ (Q W)ᵀ, so Vᵀ = Σ⁻¹ Uᵀ A: one (r, r) × (r, in) product, Q never formed. Dividing
    by σᵢ costs about log10(σ₁/σᵢ) of float64's 16 digits, so a (nearly) rank-deficient A takes
    Vᵀ = Wᵀ Qᵀ with Q built explicitly instead (no division; forming Q is the slow part).
    LAPACK's SVD of the wide matrix itself is the slowest of the three.
    """
    a = A.double()
    r = torch.linalg.qr(a.T, mode="r").R  # Aᵀ: (in, r) = Q (in, k) R (k, r), k = min(in, r)
    u, s, wt = torch.linalg.svd(r.T, full_matrices=False)  # Rᵀ (r, k) = U Σ Wᵀ
    if s.numel() and s[-1] > SVD_RTOL * s[0]:
        return (u.T @ a) / s[:, None]  # (k, in)
    return wt @ torch.linalg.qr(a.T).Q.T  # (k, k) @ (k, in)


def frobenius_norm(w: torch.Tensor, rows: int = NORM_ROWS) -> float:
    """‖w‖_F accumulated in float64 a few rows at a time (no float64 copy of the whole weight)."""
    total = 0.0
    for chunk in w.reshape(w.shape[0], -1).split(rows):
        total += torch.linalg.vector_norm(chunk, dtype=torch.float64).item() ** 2
    return math.sqrt(total)
