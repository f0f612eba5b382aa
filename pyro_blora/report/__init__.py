"""Reports on finished runs: summaries read from run folders, Markdown tables, plots and pages."""

from pyro_blora.report.pages import write_inspection, write_report

__all__ = ["write_inspection", "write_report"]
