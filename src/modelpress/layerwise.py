"""Layer-by-layer calibration: run a model block by block, feed each selected layer's inputs
to statistics, and let a technique rewrite the layer from them.

This is the sequential scheme of SparseGPT and GPTQ (Frantar & Alistarh 2023; Frantar et al.
2022) and of Wanda (Sun et al. 2023). The model's *blocks* are the largest ``nn.ModuleList``
of repeated modules that run one after the other (``encoder.layer`` in BERT, ``model.layers``
in Llama); without one, the whole model is a single block. The inputs of the first block
(positional and keyword, e.g. attention masks) are captured by stopping the forward pass
there; then, block by block: hooks on the block's selected layers accumulate input
statistics over every stored input, each layer is processed in the block's order, and the
*processed* block is re-run to give the next block its inputs, so errors propagate as in the
papers. Only one block's activations are held at a time. Selected layers outside the blocks
are processed before them (those that run before the first block) or after them, from a pass
over the whole model.

A layer's input is seen as the matrix ``X`` of *columns* its weight multiplies: rows are
tokens or samples, columns are inputs (``in`` for Linear, ``in * prod(kernel)`` for ConvNd
through im2col, in the order of ``weight.flatten(1)``). Padding tokens (where a batch's
``attention_mask`` is 0) are left out of a Linear's statistics.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from copy import deepcopy
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from modelpress.config import TechniqueConfig
from modelpress.context import Batch, batch_inputs
from modelpress.errors import DataError, UnsupportedModuleError
from modelpress.measure.flops import eval_mode

LAYERWISE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
Selected = list[tuple[str, nn.Module]]
ConvNd = nn.Conv1d | nn.Conv2d | nn.Conv3d
# keyword inputs of a block that carry a key/value cache: re-running a block must not grow it
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


class InputStats(Protocol):
    """Statistics of a layer's input columns, accumulated batch by batch."""

    def update(self, columns: torch.Tensor) -> None:
        """Add a batch of input rows ``(rows, columns)``."""


class LayerCallback(Protocol):
    """What a layer-wise technique tells the engine: which statistics, and what to do."""

    def stats(self, name: str, module: nn.Module) -> InputStats:
        """Fresh statistics for the layer ``name``."""

    def process(self, name: str, module: nn.Module, stats: InputStats) -> None:
        """Rewrite the layer (prune, quantize) from its accumulated statistics."""


class Hessian:
    """``H = 2/N sum_n x_n x_n^T`` over the input rows ``x_n``: the Hessian of the layer-wise
    reconstruction error ``||W X - W' X||^2`` that SparseGPT and GPTQ minimise.

    With ``cross``, it also keeps ``C = 2/N sum_n r_n x_n^T`` of each row's *reference* ``r_n``,
    the same row in the unprocessed model (asymmetric calibration, see
    :func:`asymmetric_target`).

    Attributes:
        matrix: ``(columns, columns)`` float32, the running mean so far.
        cross: ``(columns, columns)`` float32 ``C``, or None without ``cross``.
        rows: how many rows it averages.
    """

    def __init__(self, columns: int, *, cross: bool = False) -> None:
        self.matrix = torch.zeros(columns, columns)
        self.cross = torch.zeros(columns, columns) if cross else None
        self.rows = 0

    def update(self, columns: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        """``H <- H * n / (n + b) + 2 / (n + b) * X^T X`` for a batch ``X`` of ``b`` rows (and
        ``C`` likewise from ``R^T X``, ``reference`` the rows ``R`` matching ``X``)."""
        if not len(columns):
            return
        total = self.rows + len(columns)
        self.matrix.mul_(self.rows / total).addmm_(columns.T, columns, alpha=2 / total)
        if self.cross is not None:
            if reference is None or reference.shape != columns.shape:
                raise ValueError("Hessian(cross=True).update needs reference rows like columns")
            self.cross.mul_(self.rows / total).addmm_(reference.T, columns, alpha=2 / total)
        self.rows = total


class LayerwiseInputsConfig(TechniqueConfig):
    """Where each layer's calibration inputs come from: the options of
    :func:`calibrate_layerwise` that GPTQ and SparseGPT expose."""

    sequential: bool = Field(
        False,
        description="Inside each block, collect a layer's statistics after the layers before "
        "it are processed (one calibration pass per layer; GPTQ's 'true sequential').",
    )
    asymmetric: bool = Field(
        False,
        description="Match each layer's output to the unprocessed model's output on the "
        "unprocessed model's inputs, not on the already processed layers' (GPTAQ's asymmetric "
        "calibration).",
    )


def asymmetric_target(weight: torch.Tensor, stats: Hessian, percdamp: float) -> torch.Tensor:
    """The weight whose output on the processed model's inputs ``X`` best matches the original
    layer's output on the unprocessed model's inputs ``R``: asymmetric calibration (GPTAQ, Li
    et al. 2025), solved as a target shift.

    ``||W R - Q X||^2 = ||W R - W* X||^2 + ||(W* - Q) X||^2`` for the least-squares ``W*``, so
    running GPTQ/SparseGPT on ``W*`` with ``H`` of ``X`` minimises the asymmetric error. The
    shift is ridge-regularised toward zero, ``W* = W + W (C - H)(H + lambda I)^-1`` with
    ``C = 2/N R^T X``, so ``W* = W`` exactly when ``R = X``.

    Args:
        weight: ``(rows, cols)``.
        stats: ``H`` and ``C`` (a :class:`Hessian` with ``cross``).
        percdamp: ``lambda`` as a fraction of the mean diagonal of ``H``.

    Raises:
        torch.linalg.LinAlgError: the dampened ``H`` is not positive definite.
    """
    assert stats.cross is not None, "asymmetric_target needs Hessian(cross=True)"
    h = stats.matrix
    damped = h + percdamp * h.diagonal().mean() * torch.eye(len(h))
    gap = weight.float() @ (stats.cross - h)  # (rows, cols)
    return weight.float() + torch.linalg.solve(damped, gap.T).T  # H symmetric


def layer_target(name: str, weight: torch.Tensor, stats: Hessian, percdamp: float) -> torch.Tensor:
    """The ``(rows, cols)`` fp32 matrix GPTQ and SparseGPT process: ``weight.flatten(1)``, or,
    when ``stats`` carry the cross term ``C`` (asymmetric calibration), its
    :func:`asymmetric_target`.

    Raises:
        DataError: the dampened ``H`` is not positive definite (naming layer ``name``).
    """
    flat = weight.detach().float().flatten(1)
    if stats.cross is None:
        return flat
    with hessian_errors(name):
        return asymmetric_target(flat, stats, percdamp)


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """``U``, upper triangular with ``U^T U = (H + lambda I)^-1``, ``lambda = percdamp *
    mean(diag H)``: the factor SparseGPT and GPTQ walk column by column (its row ``j`` from
    the diagonal on holds the OBS update of the later columns when column ``j`` changes).

    Raises:
        torch.linalg.LinAlgError: the dampened ``H`` is not positive definite.
    """
    damped = hessian + percdamp * hessian.diagonal().mean() * torch.eye(len(hessian))
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(damped))
    return torch.linalg.cholesky(inverse, upper=True)


def drop_dead_inputs(
    weight: torch.Tensor, hessian: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 copies of ``weight`` ``(rows, cols)`` and ``H`` with every input that never
    fired (``H_jj = 0``) set aside: its weight column zeroed and ``H_jj = 1`` (as in SparseGPT
    and GPTQ), so ``H`` stays invertible."""
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return w, h


@contextmanager
def hessian_errors(name: str) -> Iterator[None]:
    """Turn a failed Cholesky factorisation of layer ``name``'s Hessian into a DataError.

    Raises:
        DataError: the dampened ``H`` is not positive definite.
    """
    try:
        yield
    except torch.linalg.LinAlgError:
        raise DataError(
            f"{name}: the dampened Hessian of its calibration inputs is not positive "
            "definite; raise 'percdamp' or use more calibration samples."
        ) from None


class ColumnNorms:
    """``||X_j||_2``, the L2 norm of each input column over all rows (Wanda's activation norm)."""

    def __init__(self, columns: int) -> None:
        self.sum_squares = torch.zeros(columns, dtype=torch.float64)

    def update(self, columns: torch.Tensor) -> None:
        """Add the squares of a batch's rows ``(rows, columns)``."""
        self.sum_squares += columns.double().square().sum(0)

    @property
    def norms(self) -> torch.Tensor:
        """``(columns,)`` float32 norms."""
        return self.sum_squares.sqrt().float()


def input_width(module: nn.Module) -> int:
    """Columns of a layer's input matrix: ``in`` (Linear) or ``in * prod(kernel)`` (ConvNd)."""
    return math.prod(module.weight.shape[1:])


def conv_columns(conv: ConvNd, x: torch.Tensor) -> torch.Tensor:
    """im2col for any ConvNd: the rows ``(B * prod(out), in * prod(kernel))`` with
    ``conv(x) == rows @ conv.weight.flatten(1).T + bias`` (padding, stride, dilation and
    padding modes as the layer applies them; ``groups`` must be 1).
    """
    nd = len(conv.kernel_size)
    if x.dim() == nd + 1:  # unbatched input
        x = x.unsqueeze(0)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)  # the padding conv applies
    dims = zip(conv.kernel_size, conv.stride, conv.dilation, strict=True)
    for d, (k, stride, dilation) in enumerate(dims):
        # windows along spatial dim d, appended as a last dim of size k
        x = x.unfold(2 + d, dilation * (k - 1) + 1, stride)[..., ::dilation]
    # (B, C, *out, *k) -> (B, *out, C, *k) -> (rows, C * prod(k))
    return x.movedim(1, 1 + nd).reshape(-1, conv.in_channels * math.prod(conv.kernel_size))


def input_columns(
    module: nn.Module, x: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The float32 input rows a layer multiplies its weight with (see the module docstring).

    Args:
        module: a Linear or an ungrouped ConvNd.
        x: its input, e.g. ``(B, T, in)`` or ``(B, C, H, W)``.
        token_mask: ``(B, T)`` bool, True at real tokens; rows of padding are dropped from a
            Linear input shaped ``(B, T, in)``.
    """
    if isinstance(module, nn.Linear):
        if token_mask is not None and x.dim() == 3 and x.shape[:2] == token_mask.shape:
            x = x[token_mask]
        return x.reshape(-1, x.shape[-1]).float()
    return conv_columns(module, x).float()


def check_supported(selected: Selected, owner: str) -> None:
    """Raise before any change if a selected layer cannot be calibrated layer-wise.

    Raises:
        UnsupportedModuleError: a layer that is not Linear/ConvNd, or a grouped convolution.
    """
    for name, module in selected:
        if not isinstance(module, LAYERWISE):
            raise UnsupportedModuleError(
                f"{name}: {type(module).__name__} is not supported by {owner} "
                "(supports Linear, Conv1d, Conv2d, Conv3d)."
            )
        if getattr(module, "groups", 1) != 1:
            raise UnsupportedModuleError(
                f"{name}: groups={module.groups} is not supported by {owner} (grouped and "
                "depthwise convolutions); add it to 'ignore'."
            )


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write ``weight`` as the module's weight, under any parametrizations on it.

    For a parametrized weight the value goes into ``parametrizations.weight.original``, so
    existing masks and quantizers keep acting on it; nothing is baked.
    """
    if parametrize.is_parametrized(module, "weight"):
        target = module.parametrizations.weight.original
    else:
        target = module.weight
    with torch.no_grad():
        target.copy_(weight.reshape(target.shape).to(target.dtype))


def find_blocks(model: nn.Module, selected: Selected) -> tuple[str, list[nn.Module]] | None:
    """The model's repeated blocks: the ``nn.ModuleList`` of at least two children of one type
    that holds the most selected layers (the outermost on a tie), as ``(name, blocks)``; None
    when no such list holds a selected layer.
    """
    chosen = {id(m) for _, m in selected}
    best, best_count = None, 0
    for name, module in model.named_modules():
        if (
            not isinstance(module, nn.ModuleList)
            or isinstance(module, parametrize.ParametrizationList)
            or len(module) < 2
            or len({type(child) for child in module}) != 1
        ):
            continue
        count = sum(id(m) in chosen for m in module.modules())
        if count > best_count:
            best, best_count = (name, list(module)), count
    return best


@dataclass(frozen=True)
class _Call:
    """One stored forward call: positional and keyword inputs, and the batch's real tokens."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    token_mask: torch.Tensor | None


class _StopForward(Exception):
    """Raised by the capture hook to end a forward pass at the first block."""


def _call_of(batch: Batch) -> _Call:
    inputs = batch_inputs(batch)
    if not isinstance(inputs, dict):
        return _Call((inputs,), {}, None)
    mask = inputs.get("attention_mask")
    tokens = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    return _Call((), dict(inputs), tokens)


def _run(module: nn.Module, call: _Call) -> Any:
    return module(*call.args, **call.kwargs)


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A block's main input: its first positional argument, else ``hidden_states=``."""
    return args[0] if args else kwargs.get("hidden_states")


def _first(output: Any) -> Any:
    """A block's main output: the tensor, or the first item of a tuple."""
    return output[0] if isinstance(output, (tuple, list)) and output else output


def _with_hidden(call: _Call, hidden: torch.Tensor) -> _Call:
    if call.args:
        return replace(call, args=(hidden, *call.args[1:]))
    return replace(call, kwargs={**call.kwargs, "hidden_states": hidden})


def _without_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = {k: (None if k in _CACHE_KWARGS else v) for k, v in kwargs.items()}
    if "use_cache" in out:
        out["use_cache"] = False
    return out


@contextmanager
def _removing(handles: list[RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _same(a: Any, b: Any) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    return a is b or (a.shape == b.shape and torch.equal(a, b))


def _chained(model: nn.Module, blocks: list[nn.Module], call: _Call) -> bool:
    """Whether one forward pass runs the blocks once each, in order, each on the previous
    block's output (else they are not a sequence of blocks, e.g. parallel heads)."""
    events: list[tuple[int, str, Any]] = []

    def before(i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            events.append((i, "in", _hidden(args, kwargs)))

        return hook

    def after(i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            events.append((i, "out", _first(output)))

        return hook

    handles = [
        b.register_forward_pre_hook(before(i), with_kwargs=True) for i, b in enumerate(blocks)
    ]
    handles += [b.register_forward_hook(after(i)) for i, b in enumerate(blocks)]
    with _removing(handles):
        _run(model, call)
    expected = [(i, kind) for i in range(len(blocks)) for kind in ("in", "out")]
    if [(i, kind) for i, kind, _ in events] != expected:
        return False
    tensors = [t for _, _, t in events]  # in0, out0, in1, out1, ...
    return all(_same(tensors[2 * i + 1], tensors[2 * i + 2]) for i in range(len(blocks) - 1))


@dataclass(frozen=True)
class _Reference:
    """The unprocessed copy a layer's inputs are paired with: a runner, its inputs (one per
    call of the processed runner) and its copies of the selected layers (same order)."""

    runner: nn.Module
    calls: list[_Call]
    layers: list[nn.Module]


def _reference(runner: nn.Module, calls: list[_Call], layers: Selected) -> _Reference:
    """A deep copy of ``runner`` before any of ``layers`` changes, with its copies of them."""
    names = {id(m): n for n, m in runner.named_modules()}
    copy_ = deepcopy(runner)
    modules = dict(copy_.named_modules())
    return _Reference(copy_, calls, [modules[names[id(m)]] for _, m in layers])


class _Recorder:
    """Forward pre-hooks that feed each layer's input columns to its statistics; with a
    :class:`_Reference`, each batch's columns come paired with the reference's."""

    def __init__(
        self,
        layers: Selected,
        callback: LayerCallback,
        owner: str,
        reference: _Reference | None = None,
    ) -> None:
        self.owner = owner
        self.stats = {name: callback.stats(name, module) for name, module in layers}
        self.hits = dict.fromkeys(self.stats, 0)
        self.token_mask: torch.Tensor | None = None
        self.reference = reference
        self.pending: dict[str, list[torch.Tensor]] = {name: [] for name in self.stats}
        self.handles = [
            module.register_forward_pre_hook(self._hook(name), with_kwargs=True)
            for name, module in layers
        ]
        if reference is not None:
            pairs = zip(layers, reference.layers, strict=True)
            self.handles += [
                copy_.register_forward_pre_hook(self._reference_hook(name), with_kwargs=True)
                for (name, _), copy_ in pairs
            ]

    def _columns(
        self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> torch.Tensor:
        x = args[0] if args else next(iter(kwargs.values()))
        columns = input_columns(module, x, self.token_mask)
        if not torch.isfinite(columns).all():
            raise DataError(
                f"{name}: the calibration activations reaching it contain NaN or inf, so "
                f"{self.owner} cannot use them; check the data and the model."
            )
        return columns

    def _reference_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.pending[name].append(self._columns(name, module, args, kwargs))

        return hook

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            columns = self._columns(name, module, args, kwargs)
            if self.reference is None:
                self.stats[name].update(columns)
            else:
                self.stats[name].update(columns, self.pending[name].pop(0))
            self.hits[name] += 1

        return hook

    def __enter__(self) -> _Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def run(self, runner: nn.Module, calls: list[_Call]) -> None:
        """Run ``runner`` on every call (after the reference on its matching call), feeding
        the hooks."""
        for i, call in enumerate(calls):
            if self.reference is not None:
                self.token_mask = self.reference.calls[i].token_mask
                _run(self.reference.runner, self.reference.calls[i])
            self.token_mask = call.token_mask
            _run(runner, call)


def _capture(
    model: nn.Module, block: nn.Module, calls: list[_Call], recorder: _Recorder | None = None
) -> list[_Call]:
    """The inputs of ``block`` for each call, found by stopping the forward pass there
    (``recorder``, if given, sees the layers that run before it)."""
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append((args, kwargs))
        raise _StopForward

    out = []
    with _removing([block.register_forward_pre_hook(hook, with_kwargs=True)]):
        for call in calls:
            if recorder is not None:
                recorder.token_mask = call.token_mask
            with suppress(_StopForward):
                _run(model, call)
            args, kwargs = seen.pop()
            out.append(_Call(args, _without_cache(kwargs), call.token_mask))
    return out


def _never_called(recorder: _Recorder) -> None:
    missing = [name for name, hits in recorder.hits.items() if not hits]
    if missing:
        raise UnsupportedModuleError(
            f"{missing[0]}: not called when the calibration data ran through the model, so "
            f"{recorder.owner} has no inputs to work from; add it to 'ignore'."
        )


def _calibrate_layers(
    runner: nn.Module,
    calls: list[_Call],
    layers: Selected,
    callback: LayerCallback,
    owner: str,
    sequential: bool = False,
    reference: _Reference | None = None,
) -> None:
    """Accumulate the layers' statistics over ``runner(call)`` for every call, then process
    each layer in order; ``sequential``: one pass per layer, so each layer's statistics see
    the layers processed before it; ``reference``: pair every input with the reference's."""
    if not layers:
        return
    every = list(range(len(layers)))
    for group in [[i] for i in every] if sequential else [every]:
        own = None
        if reference is not None:
            own = replace(reference, layers=[reference.layers[i] for i in group])
        with _Recorder([layers[i] for i in group], callback, owner, own) as recorder:
            recorder.run(runner, calls)
        _never_called(recorder)
        for i in group:
            name, module = layers[i]
            callback.process(name, module, recorder.stats[name])


def _inside(block: nn.Module, selected: Selected) -> Selected:
    ids = {id(m) for m in block.modules()}
    return [(n, m) for n, m in selected if id(m) in ids]


def _calibrate_blocks(
    model: nn.Module,
    blocks: list[nn.Module],
    calls: list[_Call],
    selected: Selected,
    callback: LayerCallback,
    owner: str,
    sequential: bool,
    asymmetric: bool,
) -> None:
    per_block = [_inside(block, selected) for block in blocks]
    inside = {name for layers in per_block for name, _ in layers}
    outside = [(n, m) for n, m in selected if n not in inside]
    # layers before the first block: their statistics come from the capture run itself
    with _Recorder(outside, callback, owner) as recorder:
        block_calls = _capture(model, blocks[0], calls, recorder)
    reference_calls = block_calls  # the unprocessed model's inputs of the current block
    early = [(n, m) for n, m in outside if recorder.hits[n]]
    if early:
        for name, module in early:
            callback.process(name, module, recorder.stats[name])
        block_calls = _capture(model, blocks[0], calls)  # the first block's inputs changed
    for i, (block, layers) in enumerate(zip(blocks, per_block, strict=True)):
        reference = _reference(block, reference_calls, layers) if asymmetric else None
        _calibrate_layers(block, block_calls, layers, callback, owner, sequential, reference)
        if i + 1 < len(blocks):
            block_calls = [_with_hidden(c, _first(_run(block, c))) for c in block_calls]
            if reference is not None:
                reference_calls = [
                    _with_hidden(c, _first(_run(reference.runner, c))) for c in reference_calls
                ]
    late = [(n, m) for n, m in outside if not recorder.hits[n]]
    _calibrate_layers(model, calls, late, callback, owner, sequential)


def calibrate_layerwise(
    model: nn.Module,
    batches: Sequence[Batch],
    selected: Selected,
    callback: LayerCallback,
    *,
    owner: str,
    sequential: bool = False,
    asymmetric: bool = False,
) -> None:
    """Process every selected layer from statistics of its inputs, block by block.

    See the module docstring for the scheme. The model runs in eval mode without gradients;
    every module's training flag is restored after.

    Args:
        model: the model; its selected layers are changed in place by ``callback``.
        batches: calibration input batches: tensors, or dicts of keyword tensors (Hugging
            Face models; an ``attention_mask`` marks the real tokens).
        selected: ``(name, module)`` of the Linear/ungrouped ConvNd layers to process, in
            model order (see :func:`check_supported`).
        callback: makes each layer's statistics and processes the layer.
        owner: the technique name, for messages.
        sequential: inside a block, re-run it before each layer, so a layer's statistics
            come from the layers before it already processed (GPTQ's "true sequential" for
            Llama): one pass per layer instead of one per block.
        asymmetric: pair every input row with the same row in an unprocessed copy of the
            model (a deep copy of each block, or of the whole model without blocks), for
            statistics made with ``cross`` (see :func:`asymmetric_target`). Layers after the
            blocks are calibrated without pairs.

    Raises:
        DataError: no batches, or NaN/inf in the activations reaching a selected layer.
        UnsupportedModuleError: a selected layer the calibration data never reaches.
    """
    calls = [_call_of(b) for b in batches]
    if not calls:
        raise DataError(f"{owner}: the calibration data yields no batches.")
    with eval_mode(model), torch.no_grad():
        found = find_blocks(model, selected)
        if found is not None and _chained(model, found[1], calls[0]):
            _calibrate_blocks(
                model, found[1], calls, selected, callback, owner, sequential, asymmetric
            )
        else:
            reference = _reference(model, calls, selected) if asymmetric else None
            _calibrate_layers(model, calls, selected, callback, owner, sequential, reference)
