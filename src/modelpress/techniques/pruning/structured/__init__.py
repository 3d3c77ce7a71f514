"""``prune.structured``: channel dependency graph, importance, plan, shrink (see apply.py)."""

from modelpress.techniques.pruning.structured import apply  # noqa: F401
