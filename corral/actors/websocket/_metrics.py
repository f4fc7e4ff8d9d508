"""The websocket manager's figures on ``/metrics``: its own, and its gateway's in the daemon.

Both count into the manager's store (kept by its supervisor), so the gateway's counts
show under the manager's name::

    gateway.metrics.add(FRAMES_SENT)
"""

from __future__ import annotations

from corral.metrics import Counter, Gauge

CONNECTIONS = Gauge("corral_websocket_connections", "WebSocket connections open on this daemon")
ROOMS = Gauge("corral_websocket_rooms", "Rooms with a member connected to this daemon")
EMITTED = Counter("corral_websocket_emitted_total", "Messages emitted to rooms by the service")
FRAMES_SENT = Counter("corral_websocket_frames_sent_total", "Frames sent to sockets")
ACCEPTED = Counter("corral_websocket_accepted_total", "Connections accepted (token valid)")
REFUSED = Counter(
    "corral_websocket_refused_total", "Connections refused: no token, or a token not valid"
)
SLOW = Counter(
    "corral_websocket_slow_closed_total", "Connections closed for not reading their frames"
)
FLOODING = Counter(
    "corral_websocket_flooding_closed_total", "Connections closed for sending too fast"
)
FORBIDDEN_ACTIONS = Counter(
    "corral_websocket_forbidden_total", "Joins and room actions refused by the room policies"
)
FORGED = Counter(
    "corral_websocket_forged_total",
    "Payloads refused as unsigned, forged or replayed: on room and node channels "
    "(channel), or read from a room's history (history)",
    labels=("source",),
)

FAMILIES = (
    CONNECTIONS,
    ROOMS,
    EMITTED,
    FRAMES_SENT,
    ACCEPTED,
    REFUSED,
    SLOW,
    FLOODING,
    FORBIDDEN_ACTIONS,
    FORGED,
)
"""Every family above, as the manager declares them."""

GATEWAY_COUNTS = {
    "sent": FRAMES_SENT,
    "slow": SLOW,
    "flooding": FLOODING,
    "refused": REFUSED,
    "accepted": ACCEPTED,
    "forbidden": FORBIDDEN_ACTIONS,
}
"""The gateway's counters in the manager's ``Health.metrics``, by key."""
