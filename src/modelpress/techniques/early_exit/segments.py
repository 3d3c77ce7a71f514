"""The backbone of an early-exit model cut after each exit layer (``torch.fx``).

Exporting an early-exit model as one static graph (:mod:`modelpress.runtime.cascade`) needs
the backbone in pieces: the layers up to the first exit, from there to the next, and so on to
the output. A cut needs the rest of the network to read nothing but the exit layer's output,
the rule :class:`~modelpress.techniques.early_exit.model.EarlyExitModel` states too ("choose
exits at block boundaries"), and the exit layer to run once; anything else is refused with a
one-line error naming the exit.
"""

from __future__ import annotations

from torch import fx, nn

from modelpress.errors import UnsupportedModuleError


def backbone_segments(backbone: nn.Module, exits: list[str]) -> list[fx.GraphModule]:
    """``backbone`` cut after each of ``exits`` (module names, in forward order).

    Modules that hold no exit layer stay one call each, so quantized export layers and custom
    blocks need not be traceable themselves.

    Args:
        backbone: the network; it must take one input.
        exits: the exit layers' names inside ``backbone``.

    Returns:
        ``len(exits) + 1`` modules sharing ``backbone``'s layers; segment ``i + 1`` takes
        segment ``i``'s output (the exit layer's), the first takes the backbone's input.

    Raises:
        UnsupportedModuleError: ``torch.fx`` cannot trace the backbone, it takes more than one
            input, or an exit layer is no cut (it runs more or less than once, or the network
            after it also reads an earlier value).
    """
    try:
        graph = _Tracer(exits).trace(backbone)
    except Exception as e:
        raise UnsupportedModuleError(
            f"early_exit export: torch.fx cannot trace {type(backbone).__name__} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); exporting an "
            "early-exit model needs an fx-traceable backbone."
        ) from None
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise UnsupportedModuleError(
            f"early_exit export: the backbone takes {len(inputs)} inputs; export supports "
            "backbones with one tensor input."
        )
    position = {n: i for i, n in enumerate(nodes)}
    cuts = [_cut_node(nodes, position, name) for name in exits]
    (output,) = [n for n in nodes if n.op == "output"]
    starts = [inputs[0], *cuts]
    ends = [*cuts, output]
    return [
        _segment(backbone, nodes[position[a] + 1 : position[b] + 1], a, b)
        for a, b in zip(starts, ends, strict=True)
    ]


def _segment(
    backbone: nn.Module, span: list[fx.Node], start: fx.Node, end: fx.Node
) -> fx.GraphModule:
    """The nodes ``span`` (after ``start``, up to ``end``) as a module taking ``start``'s value
    and returning ``end``'s (the graph's output when ``end`` is the output node). Parameters
    and buffers read directly (``get_attr``) are read again in every segment that uses them."""
    graph = fx.Graph()
    env = {start: graph.placeholder("x")}

    def value(arg: fx.Node) -> fx.Node:
        if arg not in env and arg.op == "get_attr":
            env[arg] = graph.get_attr(arg.target)  # type: ignore[arg-type]
        return env[arg]

    for node in span:
        if node.op == "get_attr":
            continue  # read where it is used
        if node.op == "output":
            graph.output(fx.map_arg(node.args[0], value))
        else:
            env[node] = graph.node_copy(node, value)
    if end.op != "output":
        graph.output(env[end])
    return fx.GraphModule(backbone, graph)


class _Tracer(fx.Tracer):
    """Traces into a module only when an exit layer is inside it; every other module (the exit
    layers too) is one call, so quantized export layers and custom blocks need not be
    traceable."""

    def __init__(self, exits: list[str]) -> None:
        super().__init__()
        self.exits = exits

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.exits or not any(e.startswith(f"{qualname}.") for e in self.exits)


def _cut_node(nodes: list[fx.Node], position: dict[fx.Node, int], name: str) -> fx.Node:
    """The graph node of exit layer ``name``, checked to be a cut: no value computed before
    it (the input included) is read after it."""
    calls = [n for n in nodes if n.op == "call_module" and n.target == name]
    if len(calls) != 1:
        raise UnsupportedModuleError(
            f"early_exit export: exit layer {name!r} runs {len(calls)} times in the backbone's "
            "forward; an exit must be a layer that runs once."
        )
    cut = calls[0]
    at = position[cut]
    leaks = sorted(
        {
            n.name
            for n in nodes[:at]
            if n.op != "get_attr" and any(position[u] > at for u in n.users)
        }
    )
    if leaks:
        raise UnsupportedModuleError(
            f"early_exit export: after exit layer {name!r} the network still reads {leaks} "
            "(a skip connection over the exit); put the exit at a block boundary."
        )
    return cut
