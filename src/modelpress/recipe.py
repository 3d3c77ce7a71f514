"""Recipes: an ordered list of stages, each a registered technique and its config.

YAML in, YAML out (a saved artifact embeds the recipe that made it)::

    version: 1
    name: prune-finetune-int4
    stages:
      - technique: prune.magnitude     # registry key
        sparsity: 0.9                  # every other key is a field of that technique's config
      - technique: train
        epochs: 2
      - technique: quant.rtn
        bits: 4
        group_size: 64
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from modelpress.config import TechniqueConfig, parse_config
from modelpress.errors import ConfigError, UnknownNameError, suggest
from modelpress.registry import get_technique

RECIPE_VERSION = 1


@dataclass(frozen=True)
class Stage:
    """One step of a recipe: a technique name and its validated config."""

    technique: str
    config: TechniqueConfig

    @classmethod
    def of(cls, technique: str, **params: Any) -> Stage:
        """Build and validate a stage: ``Stage.of("quant.rtn", bits=4)``."""
        spec = get_technique(technique)
        return cls(technique, parse_config(spec.config_cls, params, owner=technique))

    def to_dict(self) -> dict[str, Any]:
        """``{"technique": name, **fields the recipe set}`` (JSON/YAML-ready).

        Only fields that were given are written, so defaults (such as a technique's lenient
        default ``targets``) stay defaults when the recipe is read back.
        """
        return {
            "technique": self.technique,
            **self.config.model_dump(mode="json", exclude_unset=True),
        }


@dataclass(frozen=True)
class Recipe:
    """An ordered list of stages with a name; see the module docstring for the YAML form."""

    stages: tuple[Stage, ...]
    name: str = "custom"
    version: int = RECIPE_VERSION
    description: str = field(default="", compare=False)

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "recipe") -> Recipe:
        """Validate a recipe mapping (as read from YAML).

        Raises:
            ConfigError: wrong shape, unknown keys, unsupported version or a bad stage
                (the message names the stage number and technique).
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: a recipe must be a mapping with 'stages'. Got {data!r}.")
        allowed = {"version", "name", "description", "stages"}
        for key in data:
            if key not in allowed:
                raise ConfigError(
                    f"{where}: unknown recipe key {key!r}{suggest(str(key), allowed)}; "
                    f"valid keys: {', '.join(sorted(allowed))}."
                )
        version = data.get("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise ConfigError(f"{where}: recipe version {version!r} is not supported (use 1).")
        stages = data.get("stages")
        if not isinstance(stages, list) or not stages:
            raise ConfigError(f"{where}: 'stages' must be a non-empty list of stages.")
        return cls(
            stages=tuple(_parse_stage(s, i, where) for i, s in enumerate(stages, 1)),
            name=str(data.get("name", "custom")),
            description=str(data.get("description", "")),
        )

    @classmethod
    def from_yaml(cls, source: str | Path) -> Recipe:
        """Read a recipe from a YAML file path or a YAML string.

        Raises:
            ConfigError: unreadable YAML or an invalid recipe.
        """
        where = "recipe"
        text = str(source)
        if isinstance(source, Path) or (text.endswith((".yaml", ".yml")) and "\n" not in text):
            path = Path(source).expanduser()
            if not path.is_file():
                raise ConfigError(f"recipe file {path} not found.")
            where, text = str(path), path.read_text(encoding="utf-8")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: not valid YAML ({exc}).".replace("\n", " ")) from None
        return cls.from_dict(data, where=where)

    @classmethod
    def builtin(cls, name: str) -> Recipe:
        """A built-in recipe by name (see :func:`builtin_recipes`).

        Raises:
            UnknownNameError: no such built-in recipe (with the nearest names).
        """
        names = builtin_recipes()
        if name not in names:
            raise UnknownNameError(
                f"Unknown recipe {name!r}{suggest(name, names)}; built-in recipes: "
                f"{', '.join(names)} (or give a YAML file)."
            )
        text = resources.files("modelpress.recipes").joinpath(f"{name}.yaml").read_text()
        return cls.from_yaml(text)

    @classmethod
    def resolve(cls, name_or_path: str) -> Recipe:
        """A built-in recipe name, or a path to a YAML file."""
        if name_or_path.endswith((".yaml", ".yml")) or Path(name_or_path).is_file():
            return cls.from_yaml(Path(name_or_path))
        return cls.builtin(name_or_path)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data."""
        out: dict[str, Any] = {"version": self.version, "name": self.name}
        if self.description:
            out["description"] = self.description
        out["stages"] = [s.to_dict() for s in self.stages]
        return out

    def to_yaml(self) -> str:
        """The recipe as YAML; ``Recipe.from_yaml(r.to_yaml()) == r``."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _parse_stage(raw: Any, index: int, where: str) -> Stage:
    if not isinstance(raw, dict) or "technique" not in raw:
        raise ConfigError(f"{where}: stage {index} must be a mapping with a 'technique' key.")
    params = {k: v for k, v in raw.items() if k != "technique"}
    name = str(raw["technique"])
    try:
        return Stage.of(name, **params)
    except ConfigError as exc:
        raise type(exc)(f"{where}: stage {index} ({name}): {exc}") from None


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped in ``modelpress/recipes``."""
    files = resources.files("modelpress.recipes").iterdir()
    return sorted(f.name.removesuffix(".yaml") for f in files if f.name.endswith(".yaml"))
