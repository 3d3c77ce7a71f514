"""Load an artifact with its weight quantizers back on, ready for an integer ONNX export.

:func:`modelpress.load` decodes every tensor to float: the model computes exactly what was
saved, but the integer grid is gone from the module. The exporter needs that grid, so
:func:`load_quantized` loads the artifact as usual and then puts an ``AffineFakeQuant`` back
on every weight the artifact stores as affine codes, with the stored scales, zero points and
per-column scales. The decoded weights already lie on that grid, so the outputs do not move.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from modelpress.artifact import load_artifact, read_manifest
from modelpress.artifact.bitpack import unpack_bits
from modelpress.artifact.manifest import TENSORS
from modelpress.errors import ArtifactError
from modelpress.parametrizations import add_parametrization
from modelpress.techniques.quantization.affine import GroupLayout
from modelpress.techniques.quantization.fake_quant import AffineFakeQuant


def load_quantized(path: str | Path) -> nn.Module:
    """:func:`modelpress.load` plus the weight fake quantizers the artifact describes.

    Args:
        path: the artifact directory.

    Returns:
        The model in eval mode; every affine-coded ``<module>.weight`` carries an
        ``AffineFakeQuant`` with the stored grid (outputs equal ``modelpress.load``'s).

    Raises:
        ArtifactError: missing, corrupt or inconsistent files.
    """
    root = Path(path).expanduser()
    model = load_artifact(root)
    manifest = read_manifest(root, verify=False)  # load_artifact verified the files
    stored = load_file(str(root / TENSORS))
    for name, record in manifest["tensors"].items():
        meta = record.get("codec") or {}
        module_name, _, tensor_name = name.rpartition(".")
        if meta.get("name") != "affine" or tensor_name != "weight":
            continue
        parts = {part: stored[key] for part, key in record["payloads"].items()}
        module = model.get_submodule(module_name)
        add_parametrization(module, "weight", _quantizer(name, module.weight, meta, parts))
    return model.eval()


def _quantizer(
    name: str, weight: torch.Tensor, meta: dict[str, Any], parts: dict[str, torch.Tensor]
) -> AffineFakeQuant:
    """The fake quantizer of one stored weight, from its codec record and payloads."""
    bits = int(meta["bits"])
    layout = GroupLayout(tuple(weight.shape), meta["granularity"], meta["group_size"])
    zero_dtype = meta.get("zero_dtype", "int")
    if meta["symmetric"]:
        zero = None
    elif zero_dtype != "int":
        zero = parts["zero_point"].float()
    else:
        zero = torch.from_numpy(unpack_bits(parts["zero_point"].numpy(), bits, layout.num_groups))
    in_scale = parts.get("in_scale")
    try:
        return AffineFakeQuant(
            weight.detach(),
            bits,
            symmetric=bool(meta["symmetric"]),
            granularity=meta["granularity"],
            group_size=meta["group_size"],
            scale_dtype=meta["scale_dtype"],
            in_scale=None if in_scale is None else in_scale.float(),
            scale=parts["scale"].float(),
            zero_point=None if zero is None else zero.float(),
            zero_dtype=zero_dtype,
        )
    except (KeyError, ValueError) as exc:
        raise ArtifactError(f"{name}: its quantization record is inconsistent ({exc}).") from None
