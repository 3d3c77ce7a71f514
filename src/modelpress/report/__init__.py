"""Reports: terminal tables now (HTML with plots arrives with the search issue)."""

from modelpress.report.tables import metrics_table, render

__all__ = ["metrics_table", "render"]
