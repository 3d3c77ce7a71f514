"""``share.hash``: HashedNets (Chen, Wilson, Tyree, Weinberger, Chen 2015, "Compressing Neural
Networks with the Hashing Trick").

A hashed layer stores ``K`` real weights ``w`` and computes with a virtual weight matrix

    V[i, j] = xi(i, j) * w[h(i, j)],   h(i, j) in [0, K),   xi(i, j) in {-1, +1}

where ``h`` and ``xi`` are hashes of ``(seed, layer, i, j)`` (MurmurHash3, see
:mod:`~modelpress.techniques.sharing.murmur`; the layer enters as the CRC-32 of its name) and
``K = ceil(compression * out * in)``. For a Conv2d, ``i`` is the output channel and ``j`` the
flat position in ``(in / groups, kh, kw)``. Backpropagation through the gather gives each real
weight the sum of its virtual weights' gradients (the paper's weight gradient),

    dL/dw_k = sum_{h(i,j)=k} xi(i, j) dL/dV_ij.

Converting a trained layer starts each bucket at the least-squares fit
``w_k = mean_{h(i,j)=k} xi(i,j) W_ij`` (the sign-corrected average); ``init: random`` starts
from ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` like a fresh ``nn.Linear``, to train from scratch.

Memory: the map ``(i, j) -> h + K [xi < 0]`` into the table ``[w, -w]`` is computed once per
layer and cached as a non-persistent int32 buffer (4 bytes per virtual weight, as much as the
dense fp32 weight; one ``index_select`` per forward pass, the fastest of the options
measured), so it is never written to an artifact: the artifact holds ``w`` (+ bias) and the
structural edit records ``K``, the seed and the layer key, from which loading rebuilds the map.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from modelpress.config import TargetedConfig
from modelpress.context import Context
from modelpress.edits import edit_op, record_edit
from modelpress.errors import ArtifactError, UnsupportedModuleError
from modelpress.registry import technique
from modelpress.targeting import select_weighted
from modelpress.techniques.sharing.murmur import MASK32, murmur3_32

OWNER = "share.hash"
_CHUNK = 1 << 18  # virtual weights hashed at a time (bounds the int64 temporaries)


class HashConfig(TargetedConfig):
    """Replace Linear (and Conv2d) layers by hashed layers with K shared real weights."""

    targets: list[str] = Field(
        default_factory=lambda: ["Linear"],
        description="Modules to hash: exact names, type names (Linear, Conv2d) or 're:' regexes.",
    )
    compression: float = Field(
        0.125, gt=0, lt=1, description="Real / virtual weights per layer: K = ceil(c * out * in)."
    )
    buckets: int | None = Field(
        None, ge=1, le=2**30, description="Real weights K per layer; overrides compression."
    )
    seed: int = Field(0, ge=0, le=MASK32, description="Hash seed (32-bit); part of the model.")
    init: Literal["average", "random"] = Field(
        "average",
        description="Start from the sign-corrected bucket averages of the weights, or randomly.",
    )


def layer_key(name: str) -> int:
    """The 32-bit key of a layer in the hash: the CRC-32 of its module name (platform-free)."""
    return zlib.crc32(name.encode("utf-8")) & MASK32


def hash_buckets(
    seed: int, key: int, rows: int, cols: int, buckets: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """HashedNets' ``h(i, j)`` and ``xi(i, j)`` for every position of a ``rows x cols`` matrix.

    ``h = murmur3(key, i, j, 0; seed) mod K`` and ``xi = 1 - 2 (murmur3(key, i, j, 1; seed) & 1)``
    (two independent hashes, as Chen et al. use for the bucket and the sign).

    Args:
        seed: the hash seed, in ``[0, 2^32)``.
        key: the layer key (:func:`layer_key`), in ``[0, 2^32)``.
        rows, cols: the virtual matrix shape (each below 2^32).
        buckets: K >= 1.

    Returns:
        ``bucket`` int64 ``(rows, cols)`` in ``[0, K)`` and ``sign`` int64 ``(rows, cols)`` in
        ``{-1, +1}``.
    """
    bucket = torch.empty(rows, cols, dtype=torch.int64)
    sign = torch.empty(rows, cols, dtype=torch.int64)
    step = max(1, _CHUNK // max(cols, 1))
    col = torch.arange(cols, dtype=torch.int64)
    for r0 in range(0, rows, step):  # chunks of rows, to bound memory
        r1 = min(rows, r0 + step)
        row = torch.arange(r0, r1, dtype=torch.int64)[:, None].expand(-1, cols)
        ij = [torch.full_like(row, key), row, col[None, :].expand(r1 - r0, -1)]
        zero, one = torch.zeros_like(row), torch.ones_like(row)
        bucket[r0:r1] = murmur3_32(torch.stack([*ij, zero], dim=-1), seed) % buckets
        sign[r0:r1] = 1 - 2 * (murmur3_32(torch.stack([*ij, one], dim=-1), seed) & 1)
    return bucket, sign


def signed_index(bucket: torch.Tensor, sign: torch.Tensor, buckets: int) -> torch.Tensor:
    """Index into the table ``[w, -w]`` (length ``2K``): ``h + K [xi < 0]``, as int32."""
    return (bucket + buckets * (sign < 0)).to(torch.int32)


def bucket_average(
    weight: torch.Tensor, bucket: torch.Tensor, sign: torch.Tensor, buckets: int
) -> tuple[torch.Tensor, int]:
    """Least-squares real weights for a given virtual matrix: ``w_k = mean xi W`` over bucket k.

    Minimising ``sum_ij (W_ij - xi_ij w_h(ij))^2`` splits by bucket, and ``xi^2 = 1`` makes
    each bucket's optimum the average of its sign-corrected weights; an empty bucket gets 0.

    Args:
        weight: the virtual weights ``(rows, cols)`` to fit.
        bucket, sign: :func:`hash_buckets` of the same shape.
        buckets: K.

    Returns:
        ``(w, empty)``: float ``(K,)`` in ``weight``'s dtype and the number of empty buckets.
    """
    flat = bucket.reshape(-1)
    total = torch.zeros(buckets, dtype=torch.float64)
    total.index_add_(0, flat, (weight.detach().double() * sign).reshape(-1))
    count = torch.bincount(flat, minlength=buckets)
    w = torch.where(count > 0, total / count.clamp(min=1), 0.0)
    return w.to(weight.dtype), int((count == 0).sum())


class HashedLayer(nn.Module):
    """What :class:`HashedLinear` and :class:`HashedConv2d` share: ``K`` real weights
    ``hashed_weight``, the cached map to the virtual weight, and :meth:`virtual_weight`."""

    def __init__(
        self,
        shape: tuple[int, ...],
        buckets: int,
        seed: int,
        key: int,
        bias: bool,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.virtual_shape, self.buckets, self.seed, self.key = tuple(shape), buckets, seed, key
        rows, cols = shape[0], math.prod(shape[1:])
        bucket, sign = hash_buckets(seed, key, rows, cols, buckets)
        self.hashed_weight = nn.Parameter(torch.zeros(buckets, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(rows, dtype=dtype)) if bias else None
        self.register_buffer("index", signed_index(bucket, sign, buckets), persistent=False)

    def virtual_weight(self) -> torch.Tensor:
        """``V[i, j] = xi(i, j) w[h(i, j)]`` in the layer's weight shape (one gather)."""
        table = torch.cat([self.hashed_weight, -self.hashed_weight])  # (2K,)
        return table.index_select(0, self.index.reshape(-1)).reshape(self.virtual_shape)

    def extra_repr(self) -> str:
        """Virtual shape, real weights, seed."""
        return f"virtual={list(self.virtual_shape)}, buckets={self.buckets}, seed={self.seed}"


class HashedLinear(HashedLayer):
    """A Linear layer whose ``(out, in)`` weight is hashed from ``buckets`` real weights."""

    def __init__(
        self, in_features: int, out_features: int, buckets: int, *, seed: int, key: int,
        bias: bool = True, dtype: torch.dtype = torch.float32,
    ) -> None:  # fmt: skip
        super().__init__((out_features, in_features), buckets, seed, key, bias, dtype)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x V^T + b``: ``(..., in)`` -> ``(..., out)``."""
        return F.linear(x, self.virtual_weight(), self.bias)


class HashedConv2d(HashedLayer):
    """A Conv2d (zero padding) whose ``(out, in / groups, kh, kw)`` kernel is hashed."""

    def __init__(self, conv: nn.Conv2d, buckets: int, *, seed: int, key: int) -> None:
        super().__init__(tuple(conv.weight.shape), buckets, seed, key, conv.bias is not None,
                         conv.weight.dtype)  # fmt: skip
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``conv2d(x, V) + b``: ``(B, C_in, H, W)`` -> ``(B, C_out, H', W')``."""
        return F.conv2d(x, self.virtual_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)  # fmt: skip


def empty_hashed(module: nn.Module, buckets: int, seed: int, key: int) -> HashedLayer:
    """A hashed layer shaped like ``module`` (a Linear or Conv2d), real weights zero."""
    if isinstance(module, nn.Conv2d):
        layer: HashedLayer = HashedConv2d(module, buckets, seed=seed, key=key)
    else:
        layer = HashedLinear(module.in_features, module.out_features, buckets, seed=seed,
                             key=key, bias=module.bias is not None, dtype=module.weight.dtype)  # fmt: skip
    return layer.to(module.weight.device)


def buckets_for(numel: int, cfg: HashConfig) -> int:
    """K for a layer of ``numel`` virtual weights: ``buckets``, else ``ceil(compression * n)``."""
    return cfg.buckets if cfg.buckets is not None else max(1, math.ceil(cfg.compression * numel))


def skip_reason(module: nn.Module, cfg: HashConfig) -> str | None:
    """Why a selected layer is left as it is (hashing would not shrink it, or unsupported)."""
    if type(module) not in (nn.Linear, nn.Conv2d):
        return f"{type(module).__name__}: a subclass, its parent may use .weight directly"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
    numel = module.weight.numel()
    if buckets_for(numel, cfg) >= numel:
        return f"K={buckets_for(numel, cfg)} real weights would not be fewer than {numel}"
    return None


def hashed_from(
    module: nn.Module, name: str, cfg: HashConfig, gen: torch.Generator
) -> tuple[HashedLayer, dict[str, Any]]:
    """The hashed layer replacing ``module`` (named ``name``) and its report record.

    Args:
        module: a Linear or Conv2d.
        name: its module name (the hash's layer key).
        cfg: ``compression``/``buckets``, ``seed`` and ``init``.
        gen: draws the random initialisation (``init: random``).

    Returns:
        The layer (bias copied; real weights fitted or random) and
        ``{"virtual", "buckets", "ratio", "empty_buckets", "fit_error"}``.
    """
    weight = module.weight.detach()
    k = buckets_for(weight.numel(), cfg)
    layer = empty_hashed(module, k, cfg.seed, layer_key(name))
    rows, cols = weight.shape[0], weight[0].numel()
    index = layer.index.to(torch.int64)  # h + K [xi < 0], cached by the layer
    bucket, sign = index % k, torch.where(index >= k, -1, 1)
    fitted, empty = bucket_average(weight.reshape(rows, cols), bucket, sign, k)
    if cfg.init == "random":
        bound = 1.0 / math.sqrt(cols)  # fan_in, as nn.Linear / nn.Conv2d initialise
        fitted = ((torch.rand(k, generator=gen, dtype=torch.float64) * 2 - 1) * bound).to(weight)
    with torch.no_grad():
        layer.hashed_weight.copy_(fitted)
        if module.bias is not None:
            layer.bias.copy_(module.bias)
        err = (layer.virtual_weight() - weight).norm() / weight.norm().clamp(min=1e-30)
    record = {"virtual": weight.numel(), "buckets": k, "ratio": round(k / weight.numel(), 6),
              "empty_buckets": empty, "fit_error": round(float(err), 6)}  # fmt: skip
    return layer, record


@technique(OWNER, HashConfig)
def apply_hash(model: nn.Module, cfg: HashConfig, ctx: Context) -> nn.Module:
    """Replace Linear/Conv2d layers by HashedNets layers (Chen et al. 2015).

    Each chosen layer becomes a :class:`HashedLinear` (or :class:`HashedConv2d`) computing with
    ``V[i, j] = xi(i, j) w[h(i, j)]`` from ``K`` real weights; train it in a later ``train``
    stage (gradients reach ``w`` summed over each bucket).

    Args:
        model: the model, changed in place.
        cfg: ``compression`` or ``buckets``, ``seed``, ``init`` and ``targets``/``ignore``.
        ctx: the seeded generator for ``init: random``.

    Returns:
        The model. The stage record holds per layer ``virtual``, ``buckets``, ``ratio``,
        ``empty_buckets`` and ``fit_error`` ``||V - W||_F / ||W||_F``; and ``skipped``: the
        layers left alone and why.

    Raises:
        NoMatchingModulesError: the selection holds no Linear or Conv2d.
        UnsupportedModuleError: a selected layer carries a mask or quantizer, a selected leaf
            is of another type, or no selected layer can be hashed.
    """
    picked = select_weighted(model, cfg, owner=OWNER, supported=(nn.Linear, nn.Conv2d))
    for name, module in picked:
        if parametrize.is_parametrized(module):
            raise UnsupportedModuleError(f"{name}: carries a mask or quantizer; run {OWNER} "
                                         "before techniques that mask or quantize weights.")  # fmt: skip
    skipped = {n: why for n, m in picked if (why := skip_reason(m, cfg))}
    chosen = [(n, m) for n, m in picked if n not in skipped]
    if not chosen:
        first = next(iter(skipped.items()))
        raise UnsupportedModuleError(f"{OWNER}: no selected layer can be hashed; e.g. "
                                     f"{first[0]}: {first[1]}.")  # fmt: skip
    built = {n: hashed_from(m, n, cfg, ctx.generator(offset=i)) for i, (n, m) in enumerate(chosen)}
    for name, (layer, _) in built.items():
        model.set_submodule(name, layer)
    layers = {n: {"kind": _kind(layer), "buckets": layer.buckets, "seed": layer.seed,
                  "key": layer.key} for n, (layer, _) in built.items()}  # fmt: skip
    record_edit(model, "hashed", layers=layers)
    ctx.report("layers", {n: rec for n, (_, rec) in built.items()})
    if skipped:
        ctx.report("skipped", skipped)
    return model


def _kind(layer: HashedLayer) -> str:
    return "conv2d" if isinstance(layer, HashedConv2d) else "linear"


@edit_op("hashed")
def _replay(model: nn.Module, edit: dict[str, Any]) -> None:
    for name, spec in edit["layers"].items():
        module = model.get_submodule(name)
        expected = nn.Conv2d if spec["kind"] == "conv2d" else nn.Linear
        if not isinstance(module, expected):
            raise ArtifactError(f"{name}: the hashed edit expects a {expected.__name__}, the "
                                f"rebuilt model has a {type(module).__name__}.")  # fmt: skip
        layer = empty_hashed(module, int(spec["buckets"]), int(spec["seed"]), int(spec["key"]))
        model.set_submodule(name, layer)
