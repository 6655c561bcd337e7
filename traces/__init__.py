"""Traces: one timeline format for the simulator, the runtime and the phone.

The model (``Trace``, ``TraceEvent``, ``CounterSample``, ``TraceMeta``), Chrome Trace Event JSON I/O
(``write_trace``/``read_trace``, ``to_chrome``/``from_chrome``, ``validate_chrome``), comparison of two traces
(``compare_traces``, ``render_comparison``) and Gantt plots (``plot_gantt``; matplotlib is imported lazily).
"""

from .chrome import (
    TraceFormatError,
    from_chrome,
    lane_order,
    read_trace,
    to_chrome,
    validate_chrome,
    write_trace,
)
from .compare import Comparison, Metric, compare_traces, render_comparison
from .gantt import plot_gantt
from .io import trace_schema, write_trace_schema
from .model import CounterSample, Trace, TraceEvent, TraceMeta

__all__ = [
    "Comparison", "CounterSample", "Metric", "Trace", "TraceEvent", "TraceFormatError", "TraceMeta",
    "compare_traces", "from_chrome", "lane_order", "plot_gantt", "read_trace", "render_comparison",
    "to_chrome", "trace_schema", "validate_chrome", "write_trace", "write_trace_schema",
]
