"""Skip the blocks a quantized layer cannot affect: replay their outputs from the reference pass.

Quantizing one layer of block ``j`` of a transformer leaves blocks ``0 .. j-1`` computing
exactly what they computed in the unquantized reference pass. :class:`BlockReplay` records,
during that pass, each block's outputs (per call, in order) and, for each layer, how many of
the leading blocks had already finished when the layer first ran. While a layer is tried, the
forward of those leading blocks is replaced by one that hands back the recorded output (a
copy, so nothing downstream can change the record), and the rest of the model runs as usual:
outputs are the same as a full forward pass, for about half the compute on a block stack. The
blocks are those of the layer-by-layer engine (:func:`~modelpress.layerwise.find_blocks`).
Recorded outputs are capped at :data:`CACHE_BYTES`; blocks beyond the cap are recomputed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

CACHE_BYTES = 1 << 30  # recorded block outputs kept in memory at most (bytes)


def output_nbytes(output: Any) -> int:
    """Bytes of the tensors in a block's output (a tensor, or a tuple/list/dict of them)."""
    leaves = pytree.tree_leaves(output)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def _copy(output: Any) -> Any:
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, output)


class BlockReplay:
    """Records block outputs in a reference pass and replays the leading ones later.

    Args:
        blocks: the model's repeated blocks, in execution order (may be empty).
        layers: the layers that will be tried one at a time.
        limit: most bytes of block outputs to record.
    """

    def __init__(
        self, blocks: Sequence[nn.Module], layers: Sequence[nn.Module], limit: int = CACHE_BYTES
    ) -> None:
        self.blocks, self.layers, self.limit = list(blocks), list(layers), limit
        self.outputs: list[list[Any]] = [[] for _ in self.blocks]
        self.recorded = len(self.blocks)  # leading blocks whose every output is recorded
        self.before: list[int] = [0] * len(self.layers)  # leading blocks done before each layer

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record during the forward passes inside the ``with`` (the reference pass)."""
        done: set[int] = set()
        seen: set[int] = set()
        used = [0]

        def block_hook(i: int) -> Any:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                done.add(i)
                if i < self.recorded:
                    used[0] += output_nbytes(output)
                    if used[0] > self.limit:  # stop recording from this block on
                        self.recorded = i
                        self.outputs[i:] = [[] for _ in self.outputs[i:]]
                    else:
                        self.outputs[i].append(_copy(output))

            return hook

        def layer_hook(j: int) -> Any:
            def hook(module: nn.Module, args: Any) -> None:
                if j not in seen:
                    seen.add(j)
                    self.before[j] = next(k for k in range(len(self.blocks) + 1) if k not in done)

            return hook

        handles = [b.register_forward_hook(block_hook(i)) for i, b in enumerate(self.blocks)]
        handles += [m.register_forward_pre_hook(layer_hook(j)) for j, m in enumerate(self.layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def skippable(self, layer: int) -> int:
        """How many leading blocks can be replayed while ``layers[layer]`` is changed."""
        return min(self.before[layer], self.recorded)

    @contextmanager
    def replaying(self, count: int) -> Iterator[None]:
        """Within the ``with``, the first ``count`` blocks return their recorded outputs, in
        the order they were recorded (run the same batches as the reference pass)."""
        saved = []
        for block, outputs in zip(self.blocks[:count], self.outputs[:count], strict=True):
            saved.append(block.__dict__.get("forward"))
            replay = iter(outputs)
            block.forward = lambda *args, _it=replay, **kwargs: _copy(next(_it))
        try:
            yield
        finally:
            for block, previous in zip(self.blocks[:count], saved, strict=True):
                if previous is None:
                    with suppress(AttributeError):
                        del block.forward
                else:
                    block.forward = previous
