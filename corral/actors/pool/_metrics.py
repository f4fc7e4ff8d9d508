"""The pool manager's figures on ``/metrics``, per configured service (``service``)::

metrics.add(REQUESTS, "billing")
"""

from __future__ import annotations

from corral.metrics import LATENCY_BUCKETS, Counter, Gauge, Histogram

_SERVICE = ("service",)

REQUESTS = Counter("corral_pool_requests_total", "Calls made to the service", labels=_SERVICE)
ATTEMPTS = Counter(
    "corral_pool_attempts_total", "HTTP requests sent, retries included", labels=_SERVICE
)
RETRIES = Counter("corral_pool_retries_total", "Attempts made again", labels=_SERVICE)
RESPONSES = Counter(
    "corral_pool_responses_total",
    "Calls answered by the service, by status class (2xx, 3xx, 4xx, 5xx)",
    labels=("service", "class"),
)
ERRORS = Counter(
    "corral_pool_errors_total",
    "Calls that got no answer, by why (connect, connect_timeout, transport, protocol, "
    "timeout, breaker_open, too_large)",
    labels=("service", "kind"),
)
CALL_SECONDS = Histogram(
    "corral_pool_call_seconds",
    "Time of the calls the service answered, retries included",
    labels=_SERVICE,
    buckets=(*LATENCY_BUCKETS, 10.0, 30.0, 60.0),
)
BREAKER_TRANSITIONS = Counter(
    "corral_pool_breaker_transitions_total",
    "Changes of state of the service's circuit breakers",
    labels=_SERVICE,
)
BREAKER_STATE = Gauge(
    "corral_pool_breaker_state",
    "1 for the state a base URL's circuit breaker is in, 0 for the others",
    labels=("service", "url", "state"),
)
IN_FLIGHT = Gauge("corral_pool_in_flight", "Calls in flight to the service", labels=_SERVICE)
CONNECTIONS = Gauge(
    "corral_pool_connections",
    "Connections to the service, by state (in_use, idle)",
    labels=("service", "state"),
)
MAX_CONNECTIONS = Gauge(
    "corral_pool_max_connections", "The service's connection limit", labels=_SERVICE
)

FAMILIES = (
    REQUESTS,
    ATTEMPTS,
    RETRIES,
    RESPONSES,
    ERRORS,
    CALL_SECONDS,
    BREAKER_TRANSITIONS,
    BREAKER_STATE,
    IN_FLIGHT,
    CONNECTIONS,
    MAX_CONNECTIONS,
)
"""Every family above, as the manager declares them."""

BREAKER_STATES = ("closed", "open", "half_open")
