"""Operation metrics: Prometheus counters and latency histograms, plus a JSON snapshot."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass
class _OpStats:
    success: int = 0
    failure: int = 0
    total_s: float = 0.0
    max_s: float = 0.0
    min_s: float = 0.0
    last_error: str | None = None


class Metrics:
    def __init__(self, sandbox_counts: Callable[[], dict[tuple[str, str], int]]) -> None:
        # One registry per server instance, so tests can run several in one process.
        self.registry = CollectorRegistry()
        self._ops = Counter(
            "stacyvm_operations", "Operations by outcome", ["operation", "provider", "outcome"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "stacyvm_operation_seconds", "Operation latency", ["operation", "provider"],
            buckets=_BUCKETS, registry=self.registry,
        )
        self._sandboxes = Gauge(
            "stacyvm_sandboxes", "Live sandboxes by state and provider", ["state", "provider"],
            registry=self.registry,
        )
        self._sandbox_counts = sandbox_counts
        self._stats: dict[tuple[str, str], _OpStats] = {}

    def observe(self, operation: str, provider: str, seconds: float, ok: bool, error: str | None = None) -> None:
        self._ops.labels(operation, provider, "success" if ok else "failure").inc()
        self._latency.labels(operation, provider).observe(seconds)
        st = self._stats.setdefault((operation, provider), _OpStats(min_s=seconds))
        if ok:
            st.success += 1
        else:
            st.failure += 1
            st.last_error = error
        st.total_s += seconds
        st.max_s = max(st.max_s, seconds)
        st.min_s = min(st.min_s, seconds)

    def _refresh_gauges(self) -> dict[tuple[str, str], int]:
        counts = self._sandbox_counts()
        self._sandboxes.clear()
        for (state, provider), n in counts.items():
            self._sandboxes.labels(state, provider).set(n)
        return counts

    def render_prometheus(self) -> tuple[bytes, str]:
        self._refresh_gauges()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def snapshot(self) -> dict[str, object]:
        counts = self._refresh_gauges()
        by_state: dict[str, int] = {}
        by_provider: dict[str, int] = {}
        for (state, provider), n in counts.items():
            by_state[state] = by_state.get(state, 0) + n
            by_provider[provider] = by_provider.get(provider, 0) + n
        ops = []
        for (op, provider), st in sorted(self._stats.items()):
            n = st.success + st.failure
            item: dict[str, object] = {
                "operation": op,
                "provider": provider,
                "success_total": st.success,
                "failure_total": st.failure,
                "latency_count": n,
                "latency_total_ms": round(st.total_s * 1000, 3),
                "latency_min_ms": round(st.min_s * 1000, 3),
                "latency_max_ms": round(st.max_s * 1000, 3),
                "latency_avg_ms": round(st.total_s * 1000 / n, 3) if n else 0,
            }
            if st.last_error:
                item["last_error"] = st.last_error
            ops.append(item)
        return {
            "sandboxes": {
                "total": sum(counts.values()),
                "active": by_state.get("running", 0),
                "by_state": by_state,
                "by_provider": by_provider,
            },
            "operations": ops,
        }
