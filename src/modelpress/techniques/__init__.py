"""Every compression family, imported by name so their techniques and codecs register."""

from modelpress.techniques import (  # noqa: F401
    architecture,
    distillation,
    early_exit,
    encoding,
    finetune,
    lowrank,
    pruning,
    quantization,
    sharing,
)
