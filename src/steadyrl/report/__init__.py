"""Metric sinks, the live progress bar and end-of-run reports (plots, HTML, markdown).

Importing this package is cheap: matplotlib, TensorBoard and W&B are imported only when used.
"""

from steadyrl.report.html import make_report
from steadyrl.report.progress import ProgressBar
from steadyrl.report.sinks import MetricLogger, read_metrics

__all__ = ["MetricLogger", "ProgressBar", "make_report", "read_metrics"]
