"""Student architectures: shrink a teacher (fewer blocks, narrower), depthwise-separable convs."""

from modelpress.techniques.architecture import separable, shrink  # noqa: F401
