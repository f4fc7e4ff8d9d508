"""The cache manager's figures on ``/metrics``; a backend's carry its name (``backend``)::

counters = Counters(ManagerMetrics(), "main")
counters.add(HITS)
counters.value(HITS)      # 1
"""

from __future__ import annotations

from corral.metrics import Counter, Gauge, ManagerMetrics

_BACKEND = ("backend",)

HITS = Counter("corral_cache_hits_total", "Lookups that found a value", labels=_BACKEND)
MISSES = Counter("corral_cache_misses_total", "Lookups that found nothing", labels=_BACKEND)
L1_HITS = Counter(
    "corral_cache_l1_hits_total", "Hits served by a tiered backend's memory (L1)", labels=_BACKEND
)
SETS = Counter("corral_cache_sets_total", "Values stored", labels=_BACKEND)
DELETES = Counter("corral_cache_deletes_total", "Values deleted or invalidated", labels=_BACKEND)
EVICTIONS = Counter(
    "corral_cache_evictions_total", "Values evicted from memory to make room", labels=_BACKEND
)
EXPIRATIONS = Counter(
    "corral_cache_expirations_total", "Values dropped from memory past their TTL", labels=_BACKEND
)
BACKEND_ERRORS = Counter(
    "corral_cache_backend_errors_total", "Redis calls that failed", labels=_BACKEND
)
FALLBACKS = Counter(
    "corral_cache_fallbacks_total",
    "Operations served by the local fallback while Redis was unavailable",
    labels=_BACKEND,
)
BREAKER_OPENS = Counter(
    "corral_cache_breaker_opens_total", "Times a backend's circuit breaker opened", labels=_BACKEND
)
INVALIDATIONS_REJECTED = Counter(
    "corral_cache_invalidations_rejected_total",
    "Invalidations and lease notices refused (undecodable, forged or replayed)",
    labels=_BACKEND,
)
ENTRIES = Gauge("corral_cache_entries", "Values held in this daemon's memory", labels=_BACKEND)
BREAKER_STATE = Gauge(
    "corral_cache_breaker_state",
    "1 for the state a backend's circuit breaker is in, 0 for the others",
    labels=("backend", "state"),
)
LEASES = Gauge("corral_cache_leases", "Single-flight leases this manager waits on or holds")
LEASE_WAITERS = Gauge("corral_cache_lease_waiters", "Callers waiting for a leased value")
BATCHED_GETS = Counter(
    "corral_cache_batched_gets_total", "Gets answered together with others in one round trip"
)

BATCHED_SETS = Counter(
    "corral_cache_batched_sets_total", "Sets stored together with others in one round trip"
)

FAMILIES = (
    HITS,
    MISSES,
    L1_HITS,
    SETS,
    DELETES,
    EVICTIONS,
    EXPIRATIONS,
    BACKEND_ERRORS,
    FALLBACKS,
    BREAKER_OPENS,
    INVALIDATIONS_REJECTED,
    ENTRIES,
    BREAKER_STATE,
    LEASES,
    LEASE_WAITERS,
    BATCHED_GETS,
    BATCHED_SETS,
)
"""Every family above, as the manager declares them."""

BREAKER_STATES = ("closed", "open", "half_open")


class Counters:
    """What one backend did, counted in its manager's store (kept across restarts)."""

    __slots__ = ("backend", "metrics")

    def __init__(self, metrics: ManagerMetrics, backend: str) -> None:
        self.metrics = metrics
        self.backend = backend

    def add(self, family: Counter, by: int = 1) -> None:
        if by:
            self.metrics.add(family, self.backend, by=by)

    def value(self, family: Counter) -> int:
        return int(self.metrics.value(family, self.backend))
