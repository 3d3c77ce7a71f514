"""The maths of ``lowrank.svd``: truncated SVD, energy ranks, and activation-aware whitening.

Plain SVD (Eckart–Young): the best rank-r approximation of ``W`` ``(out, in)`` in Frobenius norm
is ``U_r Σ_r V_rᵀ``; its squared error is ``Σ_{i>r} σ_i²``.

Whitened SVD (SVD-LLM, Wang et al. 2024, "Truncation-aware Data Whitening"): with the
calibration inputs ``X`` ``(rows, in)`` of the layer, ``C = XᵀX + λI = S Sᵀ`` (Cholesky, ``S``
lower triangular). The SVD ``W S = U Σ Vᵀ`` truncated to ``r`` gives ``Ŵ = U_r Σ_r V_rᵀ S⁻¹``,
and then ``||(W - Ŵ) S||_F² = Σ_{i>r} σ_i²``: each discarded singular value of ``W S`` costs
exactly its square in output error ``||W Xᵀ - Ŵ Xᵀ||_F²`` (plus ``λ ||W - Ŵ||_F²``), so
truncating the smallest is optimal for the calibration outputs, not just for the weights.
ASVD (Yuan et al. 2023) is the diagonal special case ``S = diag(mean |x_j|)^α``.

Both factor ``Ŵ = second @ first`` with the singular values split evenly,
``first = Σ_r^½ V_rᵀ [S⁻¹]`` ``(r, in)`` and ``second = U_r Σ_r^½`` ``(out, r)``, so the two
factors have the same scale (one quantization grid fits both equally well).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelpress.errors import DataError


@dataclass(frozen=True)
class Spectrum:
    """The SVD of a layer's (possibly whitened) weight, float64, and how to undo the whitening.

    Attributes:
        u: ``(out, q)`` left singular vectors, ``q = min(out, in)``.
        s: ``(q,)`` singular values, descending.
        vh: ``(q, in)`` right singular vectors.
        chol: ``S`` ``(in, in)`` lower triangular for a whitened weight ``W S``, else None.
    """

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    chol: torch.Tensor | None = None

    @property
    def full_rank(self) -> int:
        """``q = min(out, in)``."""
        return int(self.s.numel())

    def energies(self) -> torch.Tensor:
        """``σ_i² / Σ σ_j²`` ``(q,)`` (all zero for a zero matrix)."""
        sq = self.s.square()
        total = sq.sum()
        return sq / total if total > 0 else sq

    def energy_kept(self, rank: int) -> float:
        """``Σ_{i≤r} σ_i² / Σ σ_i²``: the fraction of the (whitened) energy rank ``r`` keeps."""
        sq = self.s.square()
        total = float(sq.sum())
        return float(sq[:rank].sum()) / total if total > 0 else 1.0

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(first (r, in), second (out, r))`` with ``second @ first = Ŵ`` (module docstring).

        For a whitened spectrum ``first = Σ_r^½ V_rᵀ S⁻¹`` is computed by a triangular solve
        ``Sᵀ firstᵀ = (Σ_r^½ V_rᵀ)ᵀ``, never by inverting ``S``.
        """
        root = self.s[:rank].sqrt()  # (r,)
        first = root[:, None] * self.vh[:rank]  # (r, in)
        second = self.u[:, :rank] * root  # (out, r)
        if self.chol is not None:
            first = torch.linalg.solve_triangular(self.chol.T, first.T, upper=True).T
        return first, second


def plain_spectrum(weight: torch.Tensor) -> Spectrum:
    """The SVD of ``weight`` ``(out, in)`` in float64 (Eckart–Young truncation)."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return Spectrum(u, s, vh)


def whitening_factor(gram: torch.Tensor, damping: float, name: str) -> torch.Tensor:
    """``S`` with ``S Sᵀ = C + λI``, ``λ = damping · mean(diag C)`` (SVD-LLM's whitening).

    Args:
        gram: ``C = XᵀX`` ``(in, in)`` of the layer's calibration inputs.
        damping: ``λ`` relative to the mean input energy; keeps ``C`` positive definite when
            some inputs never fire or there are fewer rows than inputs.
        name: the layer, for the message.

    Returns:
        ``S`` ``(in, in)`` float64, lower triangular.

    Raises:
        DataError: ``C + λI`` is not positive definite (e.g. all inputs were zero).
    """
    c = gram.double()
    lam = damping * float(c.diagonal().mean())
    chol, info = torch.linalg.cholesky_ex(c + lam * torch.eye(len(c), dtype=c.dtype))
    if int(info) != 0 or not torch.isfinite(chol).all():
        raise DataError(
            f"{name}: the Gram matrix of its calibration inputs plus damping is not positive "
            "definite; raise 'damping' or use more (non-zero) calibration samples."
        )
    return chol


def whitened_spectrum(weight: torch.Tensor, chol: torch.Tensor) -> Spectrum:
    """The SVD of ``W S`` ``(out, in)``, carrying ``S`` to undo the whitening (SVD-LLM)."""
    u, s, vh = torch.linalg.svd(weight.double() @ chol, full_matrices=False)
    return Spectrum(u, s, vh, chol)


def energy_rank(spectrum: Spectrum, energy: float) -> int:
    """The smallest ``r`` with ``Σ_{i≤r} σ_i² ≥ energy · Σ σ_i²`` (at least 1)."""
    kept = spectrum.energies().cumsum(0)  # (q,)
    reached = int((kept < energy - 1e-12).sum()) + 1  # first index where kept >= energy
    return max(1, min(reached, spectrum.full_rank))


class Gram:
    """``C = XᵀX`` over a layer's calibration input rows, accumulated in float64 (the
    statistics :func:`~modelpress.layerwise.calibrate_layerwise` feeds batch by batch)."""

    def __init__(self, columns: int) -> None:
        self.matrix = torch.zeros(columns, columns, dtype=torch.float64)
        self.rows = 0

    def update(self, columns: torch.Tensor) -> None:
        """Add a batch of input rows ``(rows, in)``."""
        x = columns.double()
        self.matrix.addmm_(x.T, x)
        self.rows += len(x)
