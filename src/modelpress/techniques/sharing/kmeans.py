"""``share.kmeans``: weight sharing by per-layer k-means (Han, Mao, Dally 2016, "Deep
Compression: Compressing Deep Neural Networks with Pruning, Trained Quantization and Huffman
Coding", section 3).

The weights ``W`` of each layer are clustered into ``k = 2^bits`` clusters ``C_1..C_k``
minimising the within-cluster sum of squares (eq. 1)

    argmin_C  sum_i sum_{w in c_i} |w - c_i|^2,

starting from *linear initialisation* (centroids evenly spaced between the layer's min and max
weight, the paper's best choice, section 3.2) and running Lloyd's iterations (assign each
weight to its nearest centroid, move each centroid to its cluster's mean) until no
assignment changes or ``max_iter``; ``init: density`` starts from the weights' quantiles
instead (the paper's density-based initialisation). In 1-D, with sorted centroids, the
nearest centroid is found against the midpoints and every cluster is a run of the sorted
weights, so after one sort an iteration costs ``O(k log n)`` (binary searches and prefix
sums), with no ``n x k`` distance matrix; ties go to the lower centroid. An empty cluster
keeps its centroid. Everything is float64 and deterministic.

Pruned layers (zeros from ``prune.*``, masked or baked) are clustered on their nonzero
weights only; the zeros stay exactly zero (see :mod:`~modelpress.techniques.sharing.codebook`),
also through training. Each weight then becomes :class:`SharedWeight`, ``codebook[indices]``,
and a later ``train`` stage fine-tunes the codebook (section 3.3) with the indices fixed.
Layers that already carry a quantizer (or a codebook) are refused: their values are already
stored as codes, and sharing on top of them would silently mix two codecs.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import AfterValidator, Field
from torch import nn

from modelpress.config import TargetedConfig
from modelpress.context import Context
from modelpress.errors import NoMatchingModulesError, UnsupportedModuleError
from modelpress.parametrizations import add_parametrization, effective_tensor, parametrizations_of
from modelpress.registry import technique
from modelpress.targeting import matches, select_weighted
from modelpress.techniques.sharing.codebook import CodebookDtype, SharedWeight, on_storage_grid

OWNER = "share.kmeans"
SHAREABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def _bits_map(value: dict[str, int]) -> dict[str, int]:
    for sel, b in value.items():
        if not 1 <= b <= 8:
            raise ValueError(f"layer_bits[{sel!r}] = {b!r} is not in [1, 8]")
    return value


LayerBits = typing.Annotated[dict[str, int], AfterValidator(_bits_map)]


class KMeansConfig(TargetedConfig):
    """Per-layer k-means weight sharing: 2^bits shared values per layer, indices + codebook."""

    targets: list[str] = Field(
        default_factory=lambda: ["Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding"],
        description="Modules to share: exact names, type names or 're:' regexes.",
    )
    bits: int = Field(5, ge=1, le=8, description="Bits per weight index: k = 2^bits clusters.")
    layer_bits: LayerBits = Field(
        default_factory=dict,
        description="Per-layer bits overrides: selector -> bits in [1, 8] (e.g. Conv2d: 8).",
    )
    init: Literal["linear", "density"] = Field(
        "linear",
        description="Initial centroids: evenly spaced over [min, max], or at weight quantiles.",
    )
    max_iter: int = Field(
        300, ge=1, le=10_000, description="Most Lloyd iterations (stops when nothing moves)."
    )
    codebook_dtype: CodebookDtype = Field(
        "float32", description="Storage dtype of the codebook (the shared values)."
    )


@dataclass(frozen=True)
class KMeansFit:
    """A 1-D k-means result: sorted ``centroids (k,)``, ``labels (n,)``, iterations run and
    the inertia ``sum (x - c_label)^2``, all from float64 arithmetic."""

    centroids: torch.Tensor
    labels: torch.Tensor
    iterations: int
    inertia: float


def linear_init(values: torch.Tensor, k: int) -> torch.Tensor:
    """Han et al.'s linear initialisation: ``k`` centroids evenly spaced over
    ``[min(values), max(values)]`` (float64, ascending)."""
    x = values.detach().double()
    return torch.linspace(float(x.min()), float(x.max()), k, dtype=torch.float64)


def density_init(values: torch.Tensor, k: int) -> torch.Tensor:
    """Han et al.'s density-based initialisation: the ``k`` quantiles of the values at
    evenly spaced levels ``0, 1/(k-1), ..., 1`` of their CDF (float64, ascending)."""
    x = torch.sort(values.detach().double().reshape(-1)).values
    at = torch.round(torch.linspace(0, x.numel() - 1, k, dtype=torch.float64)).long()
    return x[at]


def assign_clusters(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the ascending ``centroids`` for each value (ties: the lower).

    ``x`` belongs to centroid ``i`` iff ``m_{i-1} < x <= m_i`` with midpoints
    ``m_i = (c_i + c_{i+1}) / 2``, so one ``bucketize`` finds every assignment.
    """
    mids = (centroids[1:] + centroids[:-1]) / 2
    return torch.bucketize(values, mids)


def cluster_splits(sorted_values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Where each cluster starts in the sorted values, under :func:`assign_clusters`' rule.

    Returns:
        int64 ``(k + 1,)``: cluster ``i`` is ``sorted_values[s[i]:s[i + 1]]``; ``s[0] = 0``,
        ``s[k] = n``, and ``s[i]`` counts the values ``<= m_{i-1}`` (``k - 1`` binary searches).
    """
    mids = (centroids[1:] + centroids[:-1]) / 2
    inner = torch.searchsorted(sorted_values, mids, right=True)
    n = torch.tensor([sorted_values.numel()])
    return torch.cat([torch.zeros(1, dtype=torch.int64), inner, n])


def cluster_means(
    prefix: torch.Tensor, splits: torch.Tensor, centroids: torch.Tensor
) -> torch.Tensor:
    """Lloyd's update: each centroid becomes the mean of its cluster; an empty one stays.

    Args:
        prefix: ``(n + 1,)`` prefix sums of the sorted values (``prefix[0] = 0``).
        splits: :func:`cluster_splits` of the current centroids.
        centroids: ``(k,)`` the current centroids.
    """
    counts = splits[1:] - splits[:-1]
    sums = prefix[splits[1:]] - prefix[splits[:-1]]
    return torch.where(counts > 0, sums / counts.clamp(min=1), centroids)


def lloyd_1d(values: torch.Tensor, centroids: torch.Tensor, max_iter: int) -> KMeansFit:
    """Lloyd's k-means on 1-D ``values`` from initial ``centroids``.

    In 1-D every cluster is a run of the sorted values, so after one sort an iteration is
    ``k`` binary searches (:func:`cluster_splits`) and ``k`` prefix-sum differences
    (:func:`cluster_means`): ``O(k log n)``, whatever ``n``.

    Args:
        values: ``(n,)`` the data (made float64).
        centroids: ``(k,)`` initial centroids.
        max_iter: the most update steps; stops early when no assignment changes.

    Returns:
        The :class:`KMeansFit` (labels consistent with the returned centroids).
    """
    x = values.detach().double().reshape(-1)
    xs = torch.sort(x).values
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(xs, 0)])
    c = torch.sort(centroids.double()).values
    splits = cluster_splits(xs, c)
    iterations = 0
    while iterations < max_iter:  # a loop over iterations; each one is vectorised
        iterations += 1
        c = torch.sort(cluster_means(prefix, splits, c)).values
        new = cluster_splits(xs, c)
        moved = not torch.equal(new, splits)
        splits = new
        if not moved:
            break
    labels = assign_clusters(x, c)
    inertia = float(((x - c[labels]) ** 2).sum())
    return KMeansFit(c, labels, iterations, inertia)


def kmeans_1d(
    values: torch.Tensor, bits: int, max_iter: int = 300, init: str = "linear"
) -> KMeansFit:
    """Deep Compression's per-layer clustering: ``2^bits`` centroids, linear init, Lloyd.

    Args:
        values: the weights to cluster (any shape; flattened), at least one.
        bits: code width; ``k = 2^bits``.
        max_iter: the most Lloyd iterations.
        init: ``"linear"`` (:func:`linear_init`, the paper's best) or ``"density"``
            (:func:`density_init`).

    Returns:
        The :class:`KMeansFit`.
    """
    flat = values.detach().reshape(-1)
    start = density_init(flat, 1 << bits) if init == "density" else linear_init(flat, 1 << bits)
    return lloyd_1d(flat, start, max_iter)


def share_weight(
    weight: torch.Tensor, bits: int, cfg: KMeansConfig
) -> tuple[SharedWeight, dict[str, Any]]:
    """Cluster the nonzero entries of ``weight`` and build its :class:`SharedWeight`.

    Args:
        weight: the effective weight (masks applied); it has at least one nonzero.
        bits: this layer's code width.
        cfg: ``init``, ``max_iter`` and ``codebook_dtype``.

    Returns:
        The parametrization (zeros get the pruned index ``k``) and the layer's report:
        ``bits``, ``k``, ``clusters_used``, ``kept`` (nonzeros clustered), ``iterations``,
        ``weight_mse`` (over the kept weights, with the stored codebook). The codebook itself
        is in the parametrization and the artifact, not repeated in the report.
    """
    flat = weight.detach().reshape(-1)
    kept = flat != 0
    fit = kmeans_1d(flat[kept], bits, cfg.max_iter, cfg.init)
    k = 1 << bits
    codebook = on_storage_grid(fit.centroids.float(), cfg.codebook_dtype)
    indices = torch.full((flat.numel(),), k, dtype=torch.int64)
    indices[kept] = fit.labels
    shared = SharedWeight(codebook, indices.reshape(weight.shape), bits, cfg.codebook_dtype)
    err = codebook.double()[fit.labels] - flat[kept].double()
    record = {
        "bits": bits,
        "k": k,
        "clusters_used": int(torch.unique(fit.labels).numel()),
        "kept": int(kept.sum()),
        "iterations": fit.iterations,
        "weight_mse": float((err**2).mean()),
    }
    return shared, record


def bits_for(name: str, module: nn.Module, cfg: KMeansConfig) -> int:
    """``cfg.layer_bits`` of the first selector matching the layer, else ``cfg.bits``."""
    for sel, bits in cfg.layer_bits.items():
        if matches(sel, name, module):
            return bits
    return cfg.bits


def _check(selected: list[tuple[str, nn.Module]], cfg: KMeansConfig) -> None:
    """Raise before any change: a layer already stores its values as codes, or a
    ``layer_bits`` selector matches none of the selected layers."""
    for name, module in selected:
        coded = [p for p in parametrizations_of(module, "weight") if hasattr(p, "value_codec")]
        if coded:
            raise UnsupportedModuleError(
                f"{name}: already quantized or shared by an earlier stage "
                f"({type(coded[0]).__name__}); {OWNER} does not mix codecs (add it to 'ignore')."
            )
    for sel in cfg.layer_bits:
        if not any(matches(sel, n, m) for n, m in selected):
            raise NoMatchingModulesError(
                f"{OWNER}: layer_bits selector {sel!r} matches none of the selected layers "
                f"({', '.join(n for n, _ in selected[:6])}{', ...' if len(selected) > 6 else ''})."
            )


@technique(OWNER, KMeansConfig)
def apply_kmeans(model: nn.Module, cfg: KMeansConfig, ctx: Context) -> nn.Module:
    """Share each layer's weights among 2^bits k-means centroids (Deep Compression).

    Every selected weight gets a :class:`SharedWeight` parametrization built by
    :func:`share_weight` (linear-initialised 1-D k-means of its nonzero weights; Han et al.
    2016, section 3). A later ``train`` stage fine-tunes the codebooks, indices fixed.

    Args:
        model: the model, changed in place.
        cfg: ``bits``, ``layer_bits``, ``init``, ``max_iter``, ``codebook_dtype``,
            ``targets``/``ignore``.
        ctx: receives the per-layer report.

    Returns:
        The model. The stage record holds per layer ``bits``, ``k``, ``clusters_used``,
        ``kept``, ``iterations``, ``weight_mse`` and ``codebook``; and ``skipped``: layers
        whose weights are all zero.

    Raises:
        NoMatchingModulesError: nothing selected, or a ``layer_bits`` selector matches none.
        UnsupportedModuleError: a selected layer is already quantized or shared, a selected
            leaf is of an unsupported type, or every selected weight is zero.
    """
    selected = select_weighted(model, cfg, owner=OWNER, supported=SHAREABLE)
    _check(selected, cfg)
    weights = {name: effective_tensor(module) for name, module in selected}
    skipped = {n: "every weight is zero" for n, w in weights.items() if not bool((w != 0).any())}
    chosen = [(n, m) for n, m in selected if n not in skipped]
    if not chosen:
        raise UnsupportedModuleError(f"{OWNER}: every selected weight is all zeros; nothing "
                                     "to cluster.")  # fmt: skip
    built = {n: share_weight(weights[n], bits_for(n, m, cfg), cfg) for n, m in chosen}
    for name, module in chosen:  # everything computed: now change the model
        add_parametrization(module, "weight", built[name][0])
    ctx.report("layers", {n: rec for n, (_, rec) in built.items()})
    if skipped:
        ctx.report("skipped", skipped)
    return model
