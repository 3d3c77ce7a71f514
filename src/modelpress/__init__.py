"""modelpress: compress trained PyTorch models, with measured bytes, latency and accuracy.

The front door::

    import modelpress as mp
    recipe = mp.Recipe.builtin("prune-finetune-int4")        # or Recipe.from_yaml(path)
    result = mp.compress(model, recipe, data="digits")
    print(result.table())
    result.save("runs/x")
    model2 = mp.load("runs/x")
"""

__version__ = "0.1.0"

from modelpress.artifact import load_artifact as load  # noqa: E402
from modelpress.artifact import save_artifact as save  # noqa: E402
from modelpress.data import DataBundle, load_data  # noqa: E402
from modelpress.models import load_model  # noqa: E402
from modelpress.pipeline import compress  # noqa: E402
from modelpress.recipe import Recipe, Stage  # noqa: E402
from modelpress.registry import technique  # noqa: E402
from modelpress.result import Result  # noqa: E402
from modelpress.train import Callback  # noqa: E402

__all__ = [
    "Callback",
    "DataBundle",
    "Recipe",
    "Result",
    "Stage",
    "compress",
    "load",
    "load_data",
    "load_model",
    "save",
    "technique",
]
