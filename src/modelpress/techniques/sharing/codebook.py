"""The shared-weight parametrization of ``share.kmeans`` and its artifact codec.

:class:`SharedWeight` sits on ``module.weight`` and makes the forward pass see
``codebook[indices]`` (Han, Mao, Dally 2016, "Deep Compression", section 3): ``indices`` is a
fixed int32 buffer with one cluster index per weight, ``codebook`` an ``nn.Parameter`` of
``k = 2^bits`` centroids. The gather's backward pass adds up the gradients of the weights of
each cluster, which is the paper's centroid gradient (eq. 3)

    dL/dC_k = sum_{i,j} dL/dW_ij * 1(I_ij = k),

so a plain ``train`` stage fine-tunes the codebook while the indices never change. Weights
that were zero when the layer was clustered (pruned) carry index ``k``, a fixed zero slot
after the codebook; a position the incoming weight has zeroed (a mask, also one narrowed
later) stays zero too.

:class:`KMeansCodec` stores the indices as ``bits``-bit codes (bit-packed, or entropy coded,
by the tensor codec) plus the codebook (fp32 or fp16). A stored value of zero whose index
points at a nonzero centroid (only possible where a mask zeroed a clustered weight, and only
in a layout that stores zeros) is written as the extra code ``k``, which widens that tensor's
codes by one bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from modelpress.artifact.bitpack import bits_needed
from modelpress.artifact.codecs import EncodedValues, register_codec
from modelpress.errors import ArtifactError

CodebookDtype = Literal["float32", "float16"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def on_storage_grid(codebook: torch.Tensor, dtype: str) -> torch.Tensor:
    """``codebook`` rounded to its storage dtype (float32 values; gradients pass through)."""
    return codebook if dtype == "float32" else codebook.to(_DTYPES[dtype]).to(codebook.dtype)


class SharedWeight(nn.Module):
    """``W -> codebook[indices]`` (zero where ``indices == k`` or the incoming ``W`` is zero)."""

    def __init__(
        self, codebook: torch.Tensor, indices: torch.Tensor, bits: int, codebook_dtype: str
    ) -> None:
        """Share a weight.

        Args:
            codebook: ``(k,)`` centroids, ``k = 2^bits`` (rounded to ``codebook_dtype``).
            indices: the weight's shape, integers in ``[0, k]``; ``k`` marks a pruned weight.
            bits: code width of a cluster index.
            codebook_dtype: ``"float32"`` or ``"float16"``, how the artifact stores centroids.
        """
        super().__init__()
        self.bits, self.codebook_dtype = bits, codebook_dtype
        self.codebook = nn.Parameter(on_storage_grid(codebook.detach().float(), codebook_dtype))
        self.register_buffer("indices", indices.detach().to(torch.int32))

    @property
    def k(self) -> int:
        """The number of clusters."""
        return self.codebook.numel()

    def table(self) -> torch.Tensor:
        """``(k + 1,)``: the codebook as stored, then the pruned slot 0."""
        codebook = on_storage_grid(self.codebook, self.codebook_dtype)
        return torch.cat([codebook, codebook.new_zeros(1)])

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """``codebook[indices]`` in ``w``'s shape and dtype; zero where ``w`` is zero."""
        flat = self.table().to(w.dtype).index_select(0, self.indices.reshape(-1))
        shared = flat.reshape(w.shape)
        return torch.where(w != 0, shared, torch.zeros_like(shared))

    def value_codec(self) -> KMeansCodec:
        """The codec storing this weight as cluster codes plus the codebook."""
        return KMeansCodec(
            bits=self.bits,
            codebook_dtype=self.codebook_dtype,
            codebook=self.table()[:-1].detach().clone(),
            indices=self.indices.detach().reshape(-1).clone(),
        )


@register_codec("kmeans")
@dataclass(frozen=True)
class KMeansCodec:
    """Cluster indices as codes of ``bits`` bits (``bits + 1`` when a stored zero needs the
    extra code ``k``), plus the ``(k,)`` codebook payload in ``codebook_dtype``."""

    bits: int
    codebook_dtype: str
    codebook: torch.Tensor
    indices: torch.Tensor
    name: ClassVar[str] = "kmeans"

    def value_bits(self) -> float:
        """Bits to charge per stored value when the tensor codec compares layouts.

        Codes are ``bits`` wide while only clustered weights are stored, but storing every
        position of a layer with ``p`` pruned weights out of ``n`` also stores the zero code,
        ``n (bits + 1)`` bits in all. Charging ``bits + n / p`` per value makes
        ``dense - sparse`` come out exactly as stored (``(n - nnz)(bits + n/p) = p bits + n``),
        so a layer with pruned weights goes to the smaller of the layouts, never to a dense
        layout that a bitmask beats. Without pruned weights it is ``bits``.
        """
        pruned = int((self.indices == self.codebook.numel()).sum())
        return float(self.bits + (self.indices.numel() / pruned if pruned else 0))

    def encode(
        self, values: torch.Tensor, positions: torch.Tensor | None, shape: tuple[int, ...]
    ) -> EncodedValues:
        """Each value's cluster index (``k`` for a zero off the codebook).

        Raises:
            ArtifactError: a value is not its cluster's centroid (the weight was changed
                after share.kmeans by something that is not a mask).
        """
        k = self.codebook.numel()
        idx = self.indices.long()
        idx = idx if positions is None else idx[positions.long()]
        table = torch.cat([self.codebook, self.codebook.new_zeros(1)]).to(values.dtype)
        codes = torch.where((values == 0) & (table[idx] != 0), k, idx)
        if not torch.equal(table[codes], values):
            raise ArtifactError(
                "share.kmeans: a shared weight holds values off its codebook; it was changed "
                "after clustering (only masks may follow share.kmeans)."
            )
        width = bits_needed(max(int(codes.max()), k - 1)) if codes.numel() else self.bits
        meta = {"bits": self.bits, "codebook_dtype": self.codebook_dtype}
        payloads = {"codebook": self.codebook.to(_DTYPES[self.codebook_dtype]).contiguous()}
        return EncodedValues(meta, payloads, codes.numpy().astype(np.int64), width)

    @staticmethod
    def decode(
        meta: dict[str, Any],
        payloads: dict[str, torch.Tensor],
        codes: np.ndarray | None,
        positions: torch.Tensor | None,
        shape: tuple[int, ...],
    ) -> torch.Tensor:
        """``[codebook, 0][code]`` for each stored code.

        Raises:
            ArtifactError: no codebook or codes, or a code past the zero slot ``k``.
        """
        if "codebook" not in payloads or codes is None:
            raise ArtifactError("a kmeans-coded tensor lacks its codebook or its codes.")
        codebook = payloads["codebook"].float()
        q = torch.from_numpy(np.asarray(codes, dtype=np.int64))
        if q.numel() and int(q.max()) > codebook.numel():
            raise ArtifactError(
                f"kmeans code {int(q.max())} is past the {codebook.numel()}-entry codebook "
                "(corrupt artifact)."
            )
        return torch.cat([codebook, codebook.new_zeros(1)])[q]
