"""Measuring depth stability: per-layer statistics, the spike score, reading a run's logs.

Imports only ``core`` and ``utils`` (docs/method.md §8).
"""

from ..utils.lazy_api import lazy_api

_EXPORTS = {
    **{name: "layer_stats" for name in ("LayerMonitor", "summarize", "layer_grad_sq", "layer_grad_sq_sharded", "capture_branch_outputs")},
    # Not "spike_score" itself: that name is the submodule's (import it from monitoring.spike_score).
    **{name: "spike_score" for name in ("SpikeConfig", "SpikeResult", "OnlineSpikeDetector")},
    **{name: "run_logs" for name in ("MONITOR_FILE", "RunLog", "RunLogError", "Series", "load_run", "read_monitor")},
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_api(__name__, _EXPORTS)
