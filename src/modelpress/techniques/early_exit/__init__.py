"""Early exit: exit heads after named layers, stopping at the first confident one (BranchyNet).

Public helpers: :class:`EarlyExitModel` (what ``early_exit.branches`` returns and
``modelpress.load`` rebuilds) and :func:`exit_statistics` (cascade accuracy and where the
samples leave, over a loader).
"""

from modelpress.techniques.early_exit import branches, calibrate, heads  # noqa: F401
from modelpress.techniques.early_exit.model import EarlyExitModel, exit_statistics

__all__ = ["EarlyExitModel", "exit_statistics"]
