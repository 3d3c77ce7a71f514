"""Test helpers: tiny models and the contract every technique passes."""

from modelpress.testing.contract import ContractError, check_config, check_technique
from modelpress.testing.models import TinyConvNet, tiny_convnet, trained_mlp

__all__ = [
    "ContractError",
    "TinyConvNet",
    "check_config",
    "check_technique",
    "tiny_convnet",
    "trained_mlp",
]
