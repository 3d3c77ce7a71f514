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

from modelpress.artifact import load_artifact as load
from modelpress.artifact import save_artifact as save
from modelpress.data import DataBundle, load_data
from modelpress.models import load_model
from modelpress.pipeline import compress
from modelpress.recipe import Recipe, Stage
from modelpress.registry import technique
from modelpress.result import Result
from modelpress.train import Callback

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
