"""The maths of ``lowrank.tt``: tensor-train matrices (Novikov et al. 2015; Oseledets 2011).

A matrix ``A`` ``(R, C)`` with ``R = ∏_k a_k`` and ``C = ∏_k b_k`` (row-major multi-indices
``i = (i_1..i_d)``, ``j = (j_1..j_d)``) is stored as ``d`` cores ``G_k`` ``(r_{k-1}, a_k, b_k,
r_k)`` with ``r_0 = r_d = 1``:

    A[i, j] = G_1[:, i_1, j_1, :] · G_2[:, i_2, j_2, :] ⋯ G_d[:, i_d, j_d, :],

``Σ_k r_{k-1} a_k b_k r_k`` numbers instead of ``R · C`` ("Tensorizing Neural Networks",
Novikov et al. 2015). The cores come from TT-SVD (Oseledets 2011, Alg. 1) of the tensor with
the row and column factors interleaved, ``(a_1 b_1, ..., a_d b_d)``, through tensorly's
``tensor_train_matrix``. Oseledets' Theorem 2.2 bounds its error by the unfoldings of that
tensor: ``||A - Â||_F² ≤ Σ_k ε_k²``, ``ε_k`` the error of the best rank-``r_k`` approximation
of unfolding ``k`` (rows ``(a_1 b_1 ⋯ a_k b_k)``). So ranks chosen with
``ε_k ≤ ε ||A||_F / √(d-1)`` give a relative error of at most ``ε``; at the full ranks
``r_k = min(∏_{j≤k} a_j b_j, ∏_{j>k} a_j b_j)`` the TT-matrix is exact.
"""

from __future__ import annotations

import math

import numpy as np
import tensorly as tl
import torch
from tensorly.decomposition import tensor_train_matrix


def prime_factors(n: int) -> list[int]:
    """The prime factors of ``n >= 1`` with multiplicity, ascending (``[]`` for 1)."""
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out + ([n] if n > 1 else [])


def balanced_factors(n: int, cores: int) -> list[int]:
    """``n`` as ``cores`` factors, as equal as its prime factors allow (padded with 1s).

    Primes are dealt largest first to the factor with the smallest product so far (the LPT
    rule), then ordered largest at the two ends and smallest in the middle, where the cores
    carry two TT ranks instead of one: e.g. ``balanced_factors(1536, 3) == [16, 8, 12]``.
    """
    factors = [1] * cores
    for p in sorted(prime_factors(n), reverse=True):
        factors[factors.index(min(factors))] *= p
    desc = sorted(factors, reverse=True)
    return desc[0::2] + desc[1::2][::-1]


def interleaved(matrix: torch.Tensor, rows: list[int], cols: list[int]) -> np.ndarray:
    """``A`` ``(R, C)`` as the numpy float64 tensor ``(a_1, .., a_d, b_1, .., b_d)``."""
    return matrix.detach().double().cpu().numpy().reshape(*rows, *cols)


def full_ranks(rows: list[int], cols: list[int]) -> list[int]:
    """The TT ranks at which a TT-matrix is exact: ``[1, r_1, .., r_{d-1}, 1]``."""
    sizes = [a * b for a, b in zip(rows, cols, strict=True)]
    total = math.prod(sizes)
    inner = [min(math.prod(sizes[: k + 1]), total // math.prod(sizes[: k + 1]))
             for k in range(len(sizes) - 1)]  # fmt: skip
    return [1, *inner, 1]


def accuracy_ranks(matrix: torch.Tensor, rows: list[int], cols: list[int], eps: float) -> list[int]:
    """The smallest TT ranks whose TT-SVD error is at most ``eps · ||A||_F`` (Oseledets 2011,
    Thm 2.2 with ``δ = eps ||A||_F / √(d-1)`` per unfolding of the interleaved tensor).

    Returns:
        ``[1, r_1, .., r_{d-1}, 1]``.
    """
    d = len(rows)
    sizes = [a * b for a, b in zip(rows, cols, strict=True)]
    order = [i for pair in zip(range(d), range(d, 2 * d), strict=True) for i in pair]
    tensor = torch.from_numpy(interleaved(matrix, rows, cols).transpose(order).copy())
    flat = tensor.reshape(*sizes)
    total = float(flat.square().sum())
    allowed = eps * eps * total / (d - 1)  # δ², per unfolding
    ranks = [1]
    for k in range(d - 1):
        s2 = torch.linalg.svdvals(flat.reshape(math.prod(sizes[: k + 1]), -1)).square()
        tail = s2.flip(0).cumsum(0).flip(0)  # tail[i] = Σ_{j≥i} σ_j²: the error of rank i
        ranks.append(max(1, int((tail > allowed).sum())))
    return [*ranks, 1]


def tt_cores(
    matrix: torch.Tensor, rows: list[int], cols: list[int], ranks: list[int]
) -> list[torch.Tensor]:
    """TT-SVD cores ``G_k`` ``(r_{k-1}, a_k, b_k, r_k)`` of ``A`` (tensorly's
    ``tensor_train_matrix``, float64; ranks above what an unfolding holds are lowered)."""
    with tl.backend_context("numpy"):
        tt = tensor_train_matrix(interleaved(matrix, rows, cols), list(ranks))
        return [torch.from_numpy(np.ascontiguousarray(f)) for f in tt.factors]


def tt_matrix(cores: list[torch.Tensor]) -> torch.Tensor:
    """The dense ``(∏ a_k, ∏ b_k)`` matrix the cores hold (for fit errors and tests)."""
    out = cores[0][0]  # (a_1, b_1, r_1)
    for core in cores[1:]:  # (r, a, b, s)
        a0, b0, _ = out.shape
        out = torch.einsum("ABr,rabs->AaBbs", out, core)
        out = out.reshape(a0 * core.shape[1], b0 * core.shape[2], core.shape[3])
    return out[..., 0]


def tt_params(rows: list[int], cols: list[int], ranks: list[int]) -> int:
    """``Σ_k r_{k-1} a_k b_k r_k``: the numbers the cores hold."""
    return sum(ranks[k] * a * b * ranks[k + 1]
               for k, (a, b) in enumerate(zip(rows, cols, strict=True)))  # fmt: skip


def contract_linear(x: torch.Tensor, cores: list[torch.Tensor]) -> torch.Tensor:
    """``x @ Aᵀ`` for ``A`` ``(out, in)`` in TT form (cores ``(r, m_k, n_k, s)``), contracting
    one core at a time without forming ``A``.

    Args:
        x: ``(B, in)``.
        cores: the TT cores of ``A`` (rows: out factors ``m_k``, columns: in factors ``n_k``).

    Returns:
        ``(B, out)``.
    """
    state = x.reshape(x.shape[0], 1, 1, x.shape[1])  # (B, M = ∏ m so far, r, N = ∏ n left)
    for core in cores:
        b, m_done, r, n_left = state.shape
        n = core.shape[2]
        state = state.reshape(b, m_done, r, n, n_left // n)
        state = torch.einsum("bMrnR,rmns->bMmsR", state, core)
        state = state.reshape(b, m_done * core.shape[1], core.shape[3], n_left // n)
    return state.reshape(x.shape[0], -1)  # (B, out)


def gather_rows(index: torch.Tensor, cores: list[torch.Tensor]) -> torch.Tensor:
    """Rows ``A[index]`` of ``A`` ``(num, dim)`` in TT form (cores ``(r, n_k, m_k, s)``, rows
    over the vocabulary factors ``n_k``), built only for the looked-up indices.

    Args:
        index: ``(N,)`` int64 row indices below ``∏ n_k``.
        cores: the TT cores.

    Returns:
        ``(N, dim)``.
    """
    sizes = [core.shape[1] for core in cores]
    strides = [math.prod(sizes[k + 1 :]) for k in range(len(sizes))]
    state = index.new_ones((len(index), 1, 1), dtype=cores[0].dtype)  # (N, M, r)
    for core, size, stride in zip(cores, sizes, strides, strict=True):
        digit = torch.div(index, stride, rounding_mode="floor") % size  # (N,)
        picked = core.permute(1, 0, 2, 3)[digit]  # (N, r, m, s)
        state = torch.einsum("bMr,brms->bMms", state, picked)
        state = state.reshape(len(index), -1, core.shape[3])
    return state[..., 0]  # (N, dim)
