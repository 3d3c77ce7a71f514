"""Channel dependency graph: which parameters must lose the same channel together.

The model is traced with ``torch.fx`` and its shapes propagated on an example input. Every
tensor in the trace gets a *channel axis* made of segments of atomic channel spaces (one
segment, or several after a concatenation). A layer that creates channels (a Conv's filters,
a Linear's neurons) opens a new space; operations that keep the channel axis
(BatchNorm, activations, pooling) pass it on; element-wise operations between two tensors
(residual additions, gating) *merge* their spaces with a union-find; ``cat`` on the channel
axis concatenates them; ``flatten`` of ``(C, H, W)`` turns each channel into ``H·W``
features of the next Linear. Spaces that reach the model's inputs or outputs, or meet an
operation this module does not understand, are *pinned*: their channels are all kept,
and the reason is recorded. This is the idea of Torch-Pruning's DepGraph (Fang et al. 2023,
"DepGraph: Towards Any Structural Pruning"), built here as union-find over channel spaces.

Every space ends with *members*: ``(module, role, offset, expand)`` where role is ``out``
(rows of a Conv/Linear weight and its bias), ``in`` (columns of a consumer's weight,
``expand`` features per channel, starting at ``offset``), ``norm`` (BatchNorm/LayerNorm
parameters and statistics) or ``depthwise`` (a depthwise conv's filters, in = out).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from modelpress.errors import UnsupportedModuleError
from modelpress.measure.flops import eval_mode

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS_CHANNEL_FIRST = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Mish, nn.ELU, nn.PReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
PASS_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.elu, F.hardswish,
    F.hardsigmoid, F.mish, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.dropout,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool2d, torch.clone, operator.neg, torch.neg, torch.abs,
}  # fmt: skip
PASS_METHODS = {
    "relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "neg", "abs", "detach",
    "float", "to", "type_as",
}  # fmt: skip
ELEMENTWISE = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
    torch.minimum,
}  # fmt: skip
ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
REDUCTIONS = {"mean", "sum", "amax", "amin"}


@dataclass(frozen=True)
class Segment:
    """A run of ``size`` channels of space ``space`` on a tensor's channel axis.

    ``expand`` features per channel: 1, or ``H·W`` once ``(C, H, W)`` is flattened.
    """

    space: int
    size: int
    expand: int = 1


@dataclass(frozen=True)
class Channels:
    """A tensor's channel axis: its dimension and the segments along it."""

    dim: int
    segments: tuple[Segment, ...]

    @property
    def width(self) -> int:
        """Features along ``dim`` (channels times their expansion)."""
        return sum(s.size * s.expand for s in self.segments)


@dataclass(frozen=True)
class Member:
    """A parameter slice coupled to a space: ``role`` of ``module`` at ``offset``."""

    module: str
    role: str  # "out" | "in" | "norm" | "depthwise"
    offset: int = 0
    expand: int = 1


@dataclass
class ChannelGraph:
    """Union-find over channel spaces, their members and the reasons some are pinned."""

    sizes: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    members: dict[int, list[Member]] = field(default_factory=dict)
    pinned: dict[int, str] = field(default_factory=dict)

    def new_space(self, size: int) -> int:
        """Open a space of ``size`` channels; returns its id."""
        self.sizes.append(size)
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, space: int) -> int:
        """The representative of ``space``'s merged set."""
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def union(self, a: int, b: int) -> None:
        """Merge two spaces of equal size (their channels are pruned together)."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self.parent[rb] = ra
        self.members.setdefault(ra, []).extend(self.members.pop(rb, []))
        if rb in self.pinned:
            self.pinned.setdefault(ra, self.pinned.pop(rb))

    def add(self, space: int, member: Member) -> None:
        """Record that ``member`` holds one slice per channel of ``space``."""
        self.members.setdefault(self.find(space), []).append(member)

    def pin(self, channels: Channels | None, reason: str) -> None:
        """Keep every channel of the spaces on ``channels``, remembering why."""
        if channels is None:
            return
        for seg in channels.segments:
            self.pinned.setdefault(self.find(seg.space), reason)

    def groups(self) -> list[Group]:
        """Every merged space that has parameters, pinned or not, in a stable order."""
        out = []
        for root in sorted(self.members):
            if self.find(root) != root:
                continue
            members = self.members[root]
            out.append(Group(self.sizes[root], tuple(members), self.pinned.get(root)))
        return out


@dataclass(frozen=True)
class Group:
    """Channels pruned together: ``size`` channels, their members, and why kept (if pinned)."""

    size: int
    members: tuple[Member, ...]
    pinned: str | None = None

    @property
    def producers(self) -> list[Member]:
        """Members that create the channels (filters/neurons, depthwise filters)."""
        return [m for m in self.members if m.role in ("out", "depthwise")]

    @property
    def modules(self) -> list[str]:
        """Names of every module the group touches, in order, without repeats."""
        return list(dict.fromkeys(m.module for m in self.members))


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` with a one-line error naming the model when it fails.

    Raises:
        UnsupportedModuleError: the model's forward cannot be traced symbolically.
    """
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many kinds; all mean "cannot trace"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModuleError(
            f"prune.structured: cannot trace {type(model).__name__} with torch.fx ({first}); "
            "structured pruning needs a traceable forward (no data-dependent control flow)."
        ) from exc


def build_graph(model: nn.Module, example_inputs: Any) -> ChannelGraph:
    """Trace ``model`` on ``example_inputs`` and return its channel dependency graph.

    Raises:
        UnsupportedModuleError: the model cannot be traced.
    """
    gm = trace(model)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with eval_mode(gm), torch.no_grad():  # gm shares its submodules with the model
        ShapeProp(gm).propagate(*args)
    return _Builder(gm).run()


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class _Builder:
    """Walks the traced graph once, giving each tensor its :class:`Channels`."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.graph = ChannelGraph()
        self.channels: dict[fx.Node, Channels | None] = {}
        self.modules = dict(gm.named_modules())

    def run(self) -> ChannelGraph:
        for node in self.gm.graph.nodes:
            self.channels[node] = self._visit(node)
        return self.graph

    # --- helpers ---------------------------------------------------------------------------

    def _fresh(self, node: fx.Node, dim: int = 1, pin: str | None = None) -> Channels | None:
        """A new space over ``node``'s channel axis ``dim`` (pinned when ``pin`` is given)."""
        shape = _shape(node)
        if shape is None or len(shape) < 2:
            return None
        dim = dim % len(shape)
        space = self.graph.new_space(shape[dim])
        channels = Channels(dim, (Segment(space, shape[dim]),))
        if pin:
            self.graph.pin(channels, pin)
        return channels

    def _inputs(self, node: fx.Node) -> list[Channels]:
        found = []
        for arg in _flat_args(node):
            info = self.channels.get(arg) if isinstance(arg, fx.Node) else None
            if info is not None:
                found.append(info)
        return found

    def _unknown(self, node: fx.Node, what: str) -> Channels | None:
        """Pin every input space and give the output a pinned space of its own."""
        for info in self._inputs(node):
            self.graph.pin(info, f"feed {what}, which prune.structured does not follow")
        return self._fresh(node, pin=f"come from {what}")

    def _merge(self, a: Channels, b: Channels, what: str) -> Channels:
        """Channels of an element-wise op on ``a`` and ``b``: the same spaces, merged."""
        sa, sb = a.segments, b.segments
        if a.dim == b.dim and [(s.size, s.expand) for s in sa] == [(s.size, s.expand) for s in sb]:
            for x, y in zip(sa, sb, strict=True):
                self.graph.union(x.space, y.space)
            return a
        self.graph.pin(a, f"meet differently split channels at {what}")
        self.graph.pin(b, f"meet differently split channels at {what}")
        return a

    # --- nodes -----------------------------------------------------------------------------

    def _visit(self, node: fx.Node) -> Channels | None:
        if node.op == "placeholder":
            return self._fresh(node, pin="are the model's input")
        if node.op == "get_attr":
            return self._fresh(node, pin=f"are the tensor attribute {node.target}")
        if node.op == "output":
            for info in self._inputs(node):
                self.graph.pin(info, "are the model's output")
            return None
        if node.op == "call_module":
            return self._module(node, self.modules[str(node.target)])
        return self._function(node)

    def _module(self, node: fx.Node, module: nn.Module) -> Channels | None:
        name = str(node.target)
        x = self.channels.get(node.args[0]) if node.args else None
        if isinstance(module, CONVS):
            return self._conv(node, name, module, x)
        if isinstance(module, nn.Linear):
            return self._linear(node, name, x)
        if isinstance(module, NORMS_CHANNEL_FIRST) and x is not None and x.dim == 1:
            self._add_members(x, name, "norm")
            return x
        is_layer_norm = isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1
        if is_layer_norm and x is not None and _is_last(node, x):
            self._add_members(x, name, "norm")
            return x
        if isinstance(module, PASS_MODULES):
            return x if _same_channel_axis(node, x) else self._unknown(node, name)
        if isinstance(module, nn.Flatten):
            return self._flatten(node, x, module.start_dim, module.end_dim)
        return self._unknown(node, f"{name} ({type(module).__name__})")

    def _conv(
        self, node: fx.Node, name: str, conv: nn.Module, x: Channels | None
    ) -> Channels | None:
        if x is None or x.dim != 1 or any(s.expand != 1 for s in x.segments):
            self.graph.pin(x, f"enter {name} in a layout it cannot follow")
            if conv.groups == 1:  # its filters can still go; its input channels stay
                return self._producer(node, name, dim=1)
            return self._fresh(node, pin=f"come from {name}, whose input is not followed")
        if conv.groups == 1:
            self._add_members(x, name, "in")
            return self._producer(node, name, dim=1)
        if conv.groups == conv.in_channels == conv.out_channels:
            self._add_members(x, name, "depthwise")
            return x
        self.graph.pin(x, f"enter {name}, a grouped conv (groups={conv.groups})")
        return self._fresh(node, pin=f"come from {name}, a grouped conv")

    def _linear(self, node: fx.Node, name: str, x: Channels | None) -> Channels | None:
        if x is None or not _is_last(node.args[0], x):
            # its neurons can still go; the input features stay (pinned)
            self.graph.pin(x, f"enter {name} on an axis other than its features")
        else:
            self._add_members(x, name, "in")
        return self._producer(node, name, dim=-1)

    def _producer(self, node: fx.Node, name: str, dim: int) -> Channels | None:
        """A new space of ``name``'s output channels along ``dim``, with it as producer."""
        out = self._fresh(node, dim=dim)
        if out is not None:
            self.graph.add(out.segments[0].space, Member(name, "out"))
        return out

    def _add_members(self, x: Channels, name: str, role: str) -> None:
        offset = 0
        for seg in x.segments:
            self.graph.add(seg.space, Member(name, role, offset, seg.expand))
            offset += seg.size * seg.expand

    def _flatten(
        self, node: fx.Node, x: Channels | None, start: int = 1, end: int = -1
    ) -> Channels | None:
        """``(N, C, *S) -> (N, C·prod(S))``: each channel becomes ``prod(S)`` features."""
        src = _shape(node.args[0]) if node.args else None
        out = _shape(node)
        if x is None or src is None or out is None:
            return self._unknown(node, "flatten")
        if x.dim != 1 or start != 1 or end not in (-1, len(src) - 1) or len(out) != 2:
            return self._unknown(node, "a flatten that moves the channel axis")
        spatial = math.prod(src[2:])
        segs = tuple(Segment(s.space, s.size, s.expand * spatial) for s in x.segments)
        return Channels(1, segs)

    def _function(self, node: fx.Node) -> Channels | None:
        target = node.target
        if node.op == "call_method" and target in ("size", "dim", "numel"):
            return None
        if node.op == "call_function" and target is operator.getitem:
            x = self.channels.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
            if x is not None:
                return self._index(node, x)
        if node.op == "call_function" and target in (getattr, operator.getitem, len):
            return None if _shape(node) is None else self._unknown(node, _name(node))
        inputs = [a for a in _flat_args(node) if isinstance(a, fx.Node) and self.channels.get(a)]
        x = self.channels.get(inputs[0]) if inputs else None
        if x is None:
            return (
                None
                if _shape(node) is None or len(_shape(node) or ()) < 2
                else self._fresh(node, pin=f"are made by {_name(node)} from no tracked channels")
            )
        if target in PASS_FUNCTIONS or (node.op == "call_method" and target in PASS_METHODS):
            return x if _same_channel_axis(node, x) else self._unknown(node, _name(node))
        if target in ELEMENTWISE or (node.op == "call_method" and target in ELEMENTWISE_METHODS):
            return self._elementwise(node, inputs)
        if target is torch.unsqueeze or (node.op == "call_method" and target == "unsqueeze"):
            d = _arg(node, 1, "dim", 0) % len(_shape(node) or (0,))
            return Channels(x.dim + (d <= x.dim), x.segments)
        if target in (torch.flatten,) or (node.op == "call_method" and target == "flatten"):
            start = _arg(node, 1, "start_dim", 0)
            end = _arg(node, 2, "end_dim", -1)
            return self._flatten(node, x, start, end)
        if (node.op == "call_method" and target in ("view", "reshape")) or target is torch.reshape:
            return self._view(node, x)
        if target in (torch.cat, torch.concat):
            return self._cat(node)
        if (node.op == "call_method" and target in REDUCTIONS) or target in (torch.mean, torch.sum):
            return self._reduce(node, x)
        return self._unknown(node, _name(node))

    def _elementwise(self, node: fx.Node, inputs: list[fx.Node]) -> Channels | None:
        infos = [self.channels[a] for a in inputs]
        out_shape = _shape(node)
        full = [
            (a, i) for a, i in zip(inputs, infos, strict=True) if _shape(a) == out_shape
        ] or list(zip(inputs, infos, strict=True))
        result = full[0][1]
        for a, info in zip(inputs, infos, strict=True):
            shape = _shape(a)
            if info is result:
                continue
            if shape is not None and len(shape) > info.dim and shape[info.dim] == 1:
                continue  # broadcast over channels: a per-sample scalar, no coupling
            assert result is not None and info is not None
            result = self._merge(result, info, _name(node))
        return result

    def _reduce(self, node: fx.Node, x: Channels) -> Channels | None:
        """A mean/sum over axes other than the channel axis (e.g. global pooling) keeps it."""
        dims = _arg(node, 1, "dim", None)
        src = _shape(node.args[0])
        if dims is None or src is None:
            return self._unknown(node, _name(node))
        dims = {d % len(src) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
        keepdim = bool(_arg(node, 2, "keepdim", False))
        if x.dim in dims:
            return self._unknown(node, f"{_name(node)} over the channel axis")
        return x if keepdim else Channels(x.dim - sum(d < x.dim for d in dims), x.segments)

    def _index(self, node: fx.Node, x: Channels) -> Channels | None:
        """``x[...]`` with full slices, ``None`` and ints: the channel axis moves, or (when
        the index selects within it) is not followed."""
        index = node.args[1]
        entries = index if isinstance(index, tuple) else (index,)
        dim, out_dims = 0, 0  # source dim reached, output dims produced so far
        for e in entries:
            if e is None:
                out_dims += 1
                continue
            full = isinstance(e, slice) and e == slice(None)
            if (dim == x.dim and not full) or not (full or isinstance(e, (int, slice))):
                return self._unknown(node, "indexing into the channel axis")
            if dim == x.dim:
                return Channels(out_dims, x.segments)
            out_dims += 0 if isinstance(e, int) else 1
            dim += 1
        return Channels(out_dims + x.dim - dim, x.segments)  # untouched trailing dims

    def _view(self, node: fx.Node, x: Channels) -> Channels | None:
        src, out = _shape(node.args[0]), _shape(node)
        flattens = src is not None and out is not None and len(src) > 2 and len(out) == 2
        if flattens and x.dim == 1 and out[0] == src[0]:  # type: ignore[index]
            return self._flatten(node, x)
        if src is not None and out is not None:
            k = x.dim
            if src[: k + 1] == out[: k + 1] and math.prod(src[k + 1 :]) == math.prod(out[k + 1 :]):
                return (
                    x  # leading dims and the channel axis unchanged (e.g. (B, C) -> (B, C, 1, 1))
                )
            if k == len(src) - 1 and out[-1] == src[-1]:
                return Channels(len(out) - 1, x.segments)  # channels last, leading dims merged
        return self._unknown(node, "a view/reshape that splits the channel axis")

    def _cat(self, node: fx.Node) -> Channels | None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = _arg(node, 1, "dim", 0)
        infos = [self.channels.get(t) for t in tensors]  # type: ignore[union-attr]
        out = _shape(node)
        if out is None or any(i is None for i in infos):
            return self._unknown(node, "cat")
        dim %= len(out)
        if all(i.dim == dim for i in infos):  # type: ignore[union-attr]
            segs = tuple(s for i in infos for s in i.segments)  # type: ignore[union-attr]
            return Channels(dim, segs)
        first = infos[0]
        for other in infos[1:]:
            first = self._merge(first, other, "cat")  # type: ignore[arg-type]
        return first


def _flat_args(node: fx.Node) -> Iterable[Any]:
    for arg in (*node.args, *node.kwargs.values()):
        if isinstance(arg, (list, tuple)):
            yield from arg
        else:
            yield arg


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _name(node: fx.Node) -> str:
    target = node.target
    return getattr(target, "__name__", str(target))


def _is_last(node: Any, x: Channels) -> bool:
    shape = _shape(node)
    return shape is not None and x.dim == len(shape) - 1


def _same_channel_axis(node: fx.Node, x: Channels | None) -> bool:
    """The output keeps ``x``'s channel axis at the same place with the same width."""
    if x is None:
        return False
    out = _shape(node)
    return out is not None and len(out) > x.dim and out[x.dim] == x.width


def module_names(groups: Sequence[Group]) -> list[str]:
    """Every module named by any group, in order."""
    return list(dict.fromkeys(m for g in groups for m in g.modules))
