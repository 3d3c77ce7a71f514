"""Every compression family, imported by name so their techniques and codecs register."""

from modelpress.techniques import finetune, pruning, quantization  # noqa: F401
