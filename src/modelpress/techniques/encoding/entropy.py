"""``encode.huffman`` and ``encode.ans``: entropy-code every integer payload of the artifact.

Both are recipe stages that need no data and change no weight: they mark the model (an
attribute that survives ``copy.deepcopy`` and later stages, like the edit log) so that ``save``
codes each integer stream of each tensor — quantized value codes, codebook indices, sparse
index gaps, bitmasks as binary streams, N:M group codes — with the chosen coder wherever the
coded form (table + stream) is smaller than bit-packing. ``modelpress.load`` decodes them.

* ``encode.huffman`` — canonical Huffman codes (Huffman 1952), as Deep Compression's last
  stage (Han et al. 2016): at most ``H + 1`` bits per symbol, H the empirical entropy.
* ``encode.ans`` — asymmetric numeral systems (Duda 2013) through ``constriction``: within a
  fraction of a percent of H on long streams, and below one bit per symbol where Huffman
  cannot go (a 90 %-zero bitmask, skewed codes).

The maths and the stored format live in :mod:`modelpress.artifact.entropy`,
:mod:`modelpress.artifact.huffman` and :mod:`modelpress.artifact.packing`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from modelpress.artifact.entropy import Coder
from modelpress.artifact.packing import EntropyCoding, entropy_coding_of, set_entropy_coding
from modelpress.config import TechniqueConfig
from modelpress.context import Context
from modelpress.registry import technique


class EntropyConfig(TechniqueConfig):
    """Which integer payloads the artifact stores entropy-coded."""

    payloads: Literal["all", "values", "indices"] = Field(
        "all",
        description="Streams to code: 'all', only value codes ('values'), or only sparse "
        "indices ('indices').",
    )


class HuffmanConfig(EntropyConfig):
    """Huffman-code the artifact's integer payloads (canonical codes, H + 1 bits at most)."""


class AnsConfig(EntropyConfig):
    """ANS-code the artifact's integer payloads (within a fraction of a percent of H)."""


def mark_model(model: nn.Module, coder: Coder, cfg: EntropyConfig, ctx: Context) -> nn.Module:
    """Mark ``model`` so that ``save`` codes its integer payloads with ``coder``.

    Args:
        model: the model; no weight changes.
        coder: ``"huffman"`` or ``"ans"``.
        cfg: which payloads to code.
        ctx: receives ``coder``, ``payloads`` and ``replaces`` (an earlier coding mark, if
            any). The mark is read when saving, so tensors that later stages quantize or
            prune are coded too.

    Returns:
        The same model.
    """
    previous = entropy_coding_of(model)
    set_entropy_coding(model, EntropyCoding(coder, cfg.payloads))
    ctx.report("coder", coder)
    ctx.report("payloads", cfg.payloads)
    if previous is not None:
        ctx.report("replaces", previous.to_dict())
    return model


@technique("encode.huffman", HuffmanConfig)
def apply_huffman(model: nn.Module, cfg: HuffmanConfig, ctx: Context) -> nn.Module:
    """Store integer payloads Huffman-coded (canonical codes; Huffman 1952, Han et al. 2016).

    See :func:`mark_model`; nothing is coded until the model is saved.
    """
    return mark_model(model, "huffman", cfg, ctx)


@technique("encode.ans", AnsConfig)
def apply_ans(model: nn.Module, cfg: AnsConfig, ctx: Context) -> nn.Module:
    """Store integer payloads ANS-coded (asymmetric numeral systems; Duda 2013).

    See :func:`mark_model`; nothing is coded until the model is saved.
    """
    return mark_model(model, "ans", cfg, ctx)
