"""Distillation: a loss inside the one training loop, so it combines with every other stage.

- ``distill.kd``: soft targets at a temperature (Hinton et al. 2015).
- ``distill.hint``: intermediate features (FitNets, Romero et al. 2015) and pooled embeddings.
- ``distill.attention``: self-attention relations (MiniLM, Wang et al. 2020; MiniLMv2 2021).

Each registers a :class:`~modelpress.train.Callback` that the next ``train`` stage runs; the
teacher (see :mod:`.teacher`) is run frozen and nothing of it lands in the artifact.
"""

from modelpress.techniques.distillation import attention, hint, kd  # noqa: F401
