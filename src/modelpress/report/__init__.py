"""Reports: terminal tables now (HTML with plots arrives with the search issue)."""

from modelpress.report.tables import layer_table, metrics_table, render

__all__ = ["layer_table", "metrics_table", "render"]
