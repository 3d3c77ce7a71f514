"""Coupled groups of a transformer: attention heads and FFN neurons, from the block layout.

Hugging Face models do not trace with ``torch.fx`` (their forward branches on caches and
attention back-ends), so their couplings are read from the two layouts the field uses:

- BERT-style: ``*.attention.self.{query,key,value}`` and ``*.attention.output.dense``;
  ``*.intermediate.dense`` and ``*.output.dense`` of each layer.
- Llama-style: ``*.self_attn.{q,k,v,o}_proj`` (grouped-query attention: one unit is a key/value
  head with the query heads that share it) and ``*.mlp.{gate,up,down}_proj``.

A head unit is ``head_dim`` rows of each projection (``n_rep · head_dim`` for the query) and
the matching columns of the output projection; an FFN neuron is one row of the up (and gate)
projection and one column of the down projection. The residual stream (hidden size) is kept.
"""

from __future__ import annotations

from torch import nn

from modelpress.techniques.pruning.structured.graph import Group, Member

ATTRS_PER_HEAD = ("num_attention_heads", "num_heads")


def _linear(modules: dict[str, nn.Module], name: str) -> nn.Linear | None:
    module = modules.get(name)
    return module if isinstance(module, nn.Linear) else None


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def attention_groups(model: nn.Module) -> list[tuple[Group, str]]:
    """One group of head units per attention module, with the module holding head counts."""
    modules = dict(model.named_modules())
    found = []
    for name, module in modules.items():
        bert = [_linear(modules, _join(name, p)) for p in ("query", "key", "value")]
        llama = [_linear(modules, _join(name, p)) for p in ("q_proj", "k_proj", "v_proj")]
        if all(bert) and hasattr(module, "attention_head_size"):
            q, k, v = ("query", "key", "value")
            out = _join(_parent(name), "output.dense")
            head_dim, n_rep = int(module.attention_head_size), 1
        elif all(llama) and _linear(modules, _join(name, "o_proj")) and hasattr(module, "head_dim"):
            q, k, v = ("q_proj", "k_proj", "v_proj")
            out = _join(name, "o_proj")
            head_dim = int(module.head_dim)
            n_rep = int(getattr(module, "num_key_value_groups", 1))
        else:
            continue
        if _linear(modules, out) is None:
            continue
        units = modules[_join(name, k)].out_features // head_dim  # type: ignore[union-attr]
        members = (
            Member(_join(name, q), "out", 0, head_dim * n_rep),
            Member(_join(name, k), "out", 0, head_dim),
            Member(_join(name, v), "out", 0, head_dim),
            Member(out, "in", 0, head_dim * n_rep),
        )
        found.append((Group(units, members), name))
    return found


def ffn_groups(model: nn.Module) -> list[Group]:
    """One group of hidden neurons per feed-forward block."""
    modules = dict(model.named_modules())
    found = []
    for name in modules:
        up, down = _linear(modules, _join(name, "intermediate.dense")), _join(name, "output.dense")
        if up is not None and _linear(modules, down) is not None:
            members = (Member(_join(name, "intermediate.dense"), "out"), Member(down, "in"))
            found.append(Group(up.out_features, members))
            continue
        gate, up_proj = _join(name, "gate_proj"), _join(name, "up_proj")
        down_proj = _join(name, "down_proj")
        if all(_linear(modules, n) for n in (gate, up_proj, down_proj)):
            width = modules[up_proj].out_features  # type: ignore[union-attr]
            members = (Member(gate, "out"), Member(up_proj, "out"), Member(down_proj, "in"))
            found.append(Group(width, members))
    return found


def transformer_groups(model: nn.Module) -> tuple[list[Group], dict[int, str]]:
    """Head and FFN groups, and for head groups (by index) the module whose counts change."""
    heads = attention_groups(model)
    groups = [g for g, _ in heads] + ffn_groups(model)
    return groups, {i: owner for i, (_, owner) in enumerate(heads)}


def head_attrs(model: nn.Module, owner: str, kept_units: int, n_rep: int) -> dict[str, int]:
    """The head-count attributes of ``owner`` after keeping ``kept_units`` key/value heads."""
    module = dict(model.named_modules())[owner]
    attrs: dict[str, int] = {}
    for attr in ATTRS_PER_HEAD:
        if hasattr(module, attr):
            attrs[attr] = kept_units * n_rep
    if hasattr(module, "all_head_size") and hasattr(module, "attention_head_size"):
        attrs["all_head_size"] = kept_units * n_rep * int(module.attention_head_size)
    if hasattr(module, "num_key_value_heads"):
        attrs["num_key_value_heads"] = kept_units
    return attrs
