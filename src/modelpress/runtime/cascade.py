"""An early-exit model as one ONNX graph that stops at the first confident exit (BranchyNet).

:class:`~modelpress.techniques.early_exit.model.EarlyExitModel` stops through forward hooks
and an exception, so a tracer would record one path only: the exit the example input took.
Here the backbone is cut after each enabled exit
(:func:`~modelpress.techniques.early_exit.segments.backbone_segments`), every piece — each
segment and each head — is exported on its own by tracing, like any model (quantized layers
become their integer ops), and the pieces are joined into one graph. Per exit ``i``::

    f = segment_i(x);  z = head_i(f)
    done = H(softmax(z)) <= tau_i          (max softmax(z) >= tau_i for ``max_prob``)
    If all(done):   z
    else:
        g, stay = If any(done): Gather(f, stay), stay    stay = NonZero(not done)
                  else:         f, []
        r = rest(g)
        If any(done): ScatterND(z, stay, r)
        else:         r

where ``rest`` is the next exit's block, or the backbone's last segment. ``rest`` appears once
(in the ``else`` of ``all``), so the graph grows linearly with the exits, and a batch in
which nobody leaves skips the gather and the scatter. That is the eval
forward of the torch model: each sample's logits come from the first exit whose head is
confident, computed with the same formula as
:func:`~modelpress.techniques.early_exit.heads.entropy`, and finished samples leave the batch
(at batch 1 the whole network after a taken exit is skipped). A disabled exit (threshold
``None``) is no cut: its head never runs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from modelpress.errors import UnsupportedModuleError
from modelpress.techniques.early_exit.model import EarlyExitModel
from modelpress.techniques.early_exit.segments import backbone_segments

PieceExporter = Callable[[nn.Module, Tensor], onnx.ModelProto]


def cascade_model(
    model: EarlyExitModel,
    example: Tensor,
    export_piece: PieceExporter,
    *,
    input_name: str,
    output_name: str,
    opset: int,
) -> onnx.ModelProto:
    """The ONNX model of ``model``'s eval forward, its exits as ``If`` branches.

    Args:
        model: the early-exit model in eval mode with at least one enabled exit (its
            thresholds are read now and become constants).
        example: one input batch of the backbone, for tracing the pieces.
        export_piece: exports one module (one tensor in, one tensor out) for an example
            input to an ONNX model with a dynamic batch axis.
        input_name: the graph's input name.
        output_name: the graph's output name (the logits).
        opset: the default-domain opset the pieces were exported at.

    Raises:
        UnsupportedModuleError: the backbone cannot be cut at the exits (see
            :func:`backbone_segments`), or a piece returns something other than one tensor.
    """
    exits = [
        (name, head, tau)
        for name, head, tau in zip(
            model.exit_names, model.heads, model.threshold_values(), strict=True
        )
        if tau is not None
    ]
    segments = backbone_segments(model.backbone, [name for name, _, _ in exits])
    pieces, x = [], example
    with torch.no_grad():
        for (name, head, _), segment in zip(exits, segments, strict=False):
            features = _tensor(segment(x), f"exit layer {name!r}")
            pieces += [export_piece(segment, x), export_piece(head, features)]
            x = features
        logits = _tensor(segments[-1](x), "the backbone")
        pieces.append(export_piece(segments[-1], x))
    builder = _Builder(pieces, _elem_type(logits), opset)
    nodes: list[onnx.NodeProto] = []
    taus = [float(tau) for _, _, tau in exits]
    out = builder.stage(0, input_name, taus, model.criterion, nodes)
    nodes.append(helper.make_node("Identity", [out], [output_name]))
    batch_dims = ["batch", *example.shape[1:]]
    graph = helper.make_graph(
        nodes,
        "early_exit_cascade",
        [helper.make_tensor_value_info(input_name, _elem_type(example), batch_dims)],
        [helper.make_tensor_value_info(output_name, builder.elem, ["batch", logits.shape[-1]])],
        initializer=builder.initializers,
    )
    domains = {o.domain: o.version for p in pieces for o in p.opset_import}
    domains[""] = opset
    imports = [helper.make_opsetid(d, v) for d, v in sorted(domains.items())]
    result = helper.make_model(graph, opset_imports=imports, producer_name="modelpress")
    result.ir_version = max(p.ir_version for p in pieces)
    onnx.checker.check_model(result)
    return result


def _tensor(value: object, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise UnsupportedModuleError(
            f"early_exit export: {what} returns {type(value).__name__}, not one tensor; exits "
            "and the backbone's output must be single tensors."
        )
    return value


def _elem_type(t: Tensor) -> int:
    return helper.np_dtype_to_tensor_dtype(t.detach().numpy().dtype)


class _Builder:
    """Inlines exported pieces into one graph and emits the exit tests and branches.

    Pieces are ``[segment_0, head_0, segment_1, head_1, ..., last_segment]``. Each piece's
    weights go into the graph once (names prefixed ``p{k}/``), and so do its nodes (values
    prefixed ``c{n}/``): every piece is inlined exactly once.
    """

    def __init__(self, pieces: list[onnx.ModelProto], elem: int, opset: int) -> None:
        self.pieces, self.elem, self.opset = pieces, elem, opset
        self.copies = itertools.count()
        self.initializers: list[TensorProto] = []
        for k, piece in enumerate(pieces):
            for init in piece.graph.initializer:
                renamed = TensorProto()
                renamed.CopyFrom(init)
                renamed.name = f"p{k}/{init.name}"
                self.initializers.append(renamed)

    def stage(self, i: int, x: str, taus: list[float], criterion: str, nodes: list) -> str:
        """Emit exit ``i`` onwards reading value ``x`` into ``nodes``; returns the logits.

        The rest of the network is emitted once, in the "not all leave" branch; two small
        ``If`` nodes around it pick its input (the staying samples, or the whole batch when
        none leave) and put its logits back, so the graph grows linearly with the exits."""
        if i == len(taus):
            return self.inline(len(self.pieces) - 1, x, nodes)
        c = f"c{next(self.copies)}/"
        f = self.inline(2 * i, x, nodes)
        z = self.inline(2 * i + 1, f, nodes)
        done = self.exit_test(z, criterion, taus[i], c, nodes)
        flags = c + "done_i32"
        nodes.append(helper.make_node("Cast", [done], [flags], to=TensorProto.INT32))
        every = self.reduce_flags("ReduceMin", flags, c + "every", nodes)
        go_on: list[onnx.NodeProto] = []  # not all leave
        some = self.reduce_flags("ReduceMax", flags, c + "some", go_on)
        select = [  # some leave: the others go on alone
            helper.make_node("Not", [done], [c + "stays"]),
            helper.make_node("NonZero", [c + "stays"], [c + "stay_1n"]),  # (1, n)
            helper.make_node("Transpose", [c + "stay_1n"], [c + "stay_n1"], perm=[1, 0]),
            helper.make_node(
                "Squeeze", [c + "stay_1n", self.const(c + "axis0", [0])], [c + "stay"]
            ),
            helper.make_node("Gather", [f, c + "stay"], [c + "f_stay"], axis=0),
        ]
        keep = [  # none leave: everyone goes on; no sample indices are needed
            helper.make_node("Identity", [f], [c + "f_all"]),
            helper.make_node(
                "Constant", [], [c + "no_index"],
                value=helper.make_tensor(c + "no_index", TensorProto.INT64, [0, 1], []),
            ),
        ]  # fmt: skip
        go_on.append(
            self.branch_if(
                some,
                (select, [c + "f_stay", c + "stay_n1"]),
                (keep, [c + "f_all", c + "no_index"]),
                [c + "f_next", c + "index"],
                [self.output_elem(2 * i), TensorProto.INT64],
            )
        )
        rest = self.stage(i + 1, c + "f_next", taus, criterion, go_on)
        put_back = [helper.make_node("ScatterND", [z, c + "index", rest], [c + "mixed"])]
        whole = [helper.make_node("Identity", [rest], [c + "whole"])]
        go_on.append(
            self.branch_if(some, (put_back, [c + "mixed"]), (whole, [c + "whole"]), [c + "goes_on"])
        )
        leave = [helper.make_node("Identity", [z], [c + "left"])]
        out = c + "out"
        nodes.append(self.branch_if(every, (leave, [c + "left"]), (go_on, [c + "goes_on"]), [out]))
        return out

    @staticmethod
    def reduce_flags(op: str, flags: str, out: str, nodes: list) -> str:
        """``out = op(flags)`` over every sample as a bool scalar (ReduceMin: all; Max: any)."""
        nodes.append(helper.make_node(op, [flags], [out + "_i32"], keepdims=0))
        nodes.append(helper.make_node("Cast", [out + "_i32"], [out], to=TensorProto.BOOL))
        return out

    def branch_if(
        self,
        cond: str,
        then: tuple[list, list[str]],
        other: tuple[list, list[str]],
        outs: list[str],
        elems: list[int] | None = None,
    ) -> onnx.NodeProto:
        """``outs = If(cond, then, other)``; each branch is its nodes and the names of its
        outputs, whose element types are ``elems`` (default: the logits')."""
        types = elems or [self.elem] * len(outs)

        def graph(branch: tuple[list, list[str]], which: str) -> onnx.GraphProto:
            body, names = branch
            values = [
                helper.make_tensor_value_info(n, t, None) for n, t in zip(names, types, strict=True)
            ]
            return helper.make_graph(body, f"{outs[0]}_{which}", [], values)

        return helper.make_node(
            "If", [cond], outs, then_branch=graph(then, "then"), else_branch=graph(other, "else")
        )

    def exit_test(self, z: str, criterion: str, tau: float, c: str, nodes: list) -> str:
        """``H(softmax z) <= tau`` or ``max softmax z >= tau`` per row; returns the bool."""
        nodes.append(helper.make_node("Softmax", [z], [c + "p"], axis=-1))
        last = self.const(c + "axis_last", [-1])
        bound = self.scalar(c + "tau", tau)
        if criterion == "entropy":
            nodes += [
                helper.make_node("LogSoftmax", [z], [c + "logp"], axis=-1),
                helper.make_node("Mul", [c + "p", c + "logp"], [c + "plogp"]),
                helper.make_node("ReduceSum", [c + "plogp", last], [c + "negh"], keepdims=0),
                helper.make_node("Neg", [c + "negh"], [c + "h"]),
                helper.make_node("LessOrEqual", [c + "h", bound], [c + "done"]),
            ]
        else:
            if self.opset >= 18:
                peak = helper.make_node("ReduceMax", [c + "p", last], [c + "pmax"], keepdims=0)
            else:
                peak = helper.make_node("ReduceMax", [c + "p"], [c + "pmax"], axes=[-1], keepdims=0)
            nodes += [peak, helper.make_node("GreaterOrEqual", [c + "pmax", bound], [c + "done"])]
        return c + "done"

    def inline(self, k: int, x: str, nodes: list) -> str:
        """Copy piece ``k``'s nodes into ``nodes`` reading ``x``; returns its output's name."""
        graph = self.pieces[k].graph
        copy = f"c{next(self.copies)}/"
        weights = {init.name for init in graph.initializer}
        (source,) = [v.name for v in graph.input if v.name not in weights]
        names = {source: x} | {w: f"p{k}/{w}" for w in weights}

        def rename(v: str) -> str:
            return v if not v else names.setdefault(v, copy + v)

        for node in graph.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                   for a in node.attribute):  # fmt: skip
                raise UnsupportedModuleError(
                    f"early_exit export: a piece of the network exports with control flow "
                    f"({node.op_type}); it cannot be nested in the exit branches."
                )
            inlined = onnx.NodeProto()
            inlined.CopyFrom(node)
            inlined.name = copy + node.name
            inlined.input[:] = [rename(v) for v in node.input]
            inlined.output[:] = [rename(v) for v in node.output]
            nodes.append(inlined)
        return rename(graph.output[0].name)

    def output_elem(self, k: int) -> int:
        """The element type of piece ``k``'s output."""
        return self.pieces[k].graph.output[0].type.tensor_type.elem_type

    def const(self, name: str, values: list[int]) -> str:
        self.initializers.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
        return name

    def scalar(self, name: str, value: float) -> str:
        dtype = helper.tensor_dtype_to_np_dtype(self.elem)
        self.initializers.append(numpy_helper.from_array(np.array(value, dtype=dtype), name))
        return name
