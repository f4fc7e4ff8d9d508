"""The ratelimit manager against a real redis-server (and its memory backend)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis

from corral.actors.ratelimit import RatelimitManager
from corral.actors.ratelimit._memory import sliding_window, token_bucket
from corral.actors.ratelimit._options import Rule, parse_limit
from corral.clock import ManualClock
from corral.config import Config, ManagerSection
from corral.errors import BackendUnavailable, ConfigError, InvalidMessage, NotFound
from corral.messages.codec import Codec
from corral.messages.ratelimit import (
    RatelimitBan,
    RatelimitCheck,
    RatelimitDecision,
    RatelimitInfo,
    RatelimitReset,
    RatelimitUnban,
)
from corral.messages.system import HealthCheck
from corral.supervisor import ChildSpec
from corral.system import System
from tests.redis_server import RedisServer
from tests.support import mailbox_depth, wait_until

HOUR = 3600.0


@contextmanager
def limiter(
    options: dict[str, Any], url: str = "", clock: ManualClock | None = None
) -> Iterator[System]:
    """A System with the ratelimit manager: memory when ``url`` is empty; a ``#cluster``
    suffix on the URL picks the Redis Cluster layout (one script per identifier)."""
    url, _, layout = url.partition("#")
    options = {"backend": "redis" if url else "memory", "redis_url": url, **options}
    options.setdefault("cluster", layout == "cluster")
    with System(
        managers=[ChildSpec(name="ratelimit", manager=RatelimitManager, options=options)],
        clock=clock,
    ) as s:
        yield s


@pytest.fixture
def clock() -> ManualClock:
    """For what the limiter times itself, on Redis too: its local cache, the retry interval."""
    return ManualClock()


class Timeline:
    """Time going by for a limiter on ``url``. In memory the limiter reads a manual clock,
    moved at once. On Redis its windows and bans run on Redis's clock, which cannot be
    moved: ``advance`` waits until Redis's clock has moved as far (and the limiter reads the
    machine's clock, so that the times it reports from Redis's answers agree with it)."""

    def __init__(self, url: str) -> None:
        self.url = url.partition("#")[0]
        self.clock = None if self.url else ManualClock()

    def advance(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.advance(seconds)
            return
        with redis.Redis.from_url(self.url) as client:
            until = redis_now(client) + seconds
            wait_until(lambda: redis_now(client) >= until)


@pytest.fixture
def timeline(url: str) -> Timeline:
    return Timeline(url)


def redis_now(client: redis.Redis) -> float:
    seconds, microseconds = client.time()
    return seconds + microseconds / 1_000_000


@pytest.fixture(params=["memory", "redis", "redis-cluster-layout"])
def url(request: pytest.FixtureRequest) -> str:
    """Run the test on each backend and Redis layout ('' is memory)."""
    if request.param == "memory":
        return ""
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url + ("#cluster" if request.param.endswith("cluster-layout") else "")


def state(decision: RatelimitDecision, rule: str) -> Any:
    (found,) = [s for s in decision.rules if s.rule == rule]
    return found


# -- rules --------------------------------------------------------------------------------


def test_limits_parse() -> None:
    assert parse_limit("100/minute") == (100, 60.0)
    assert parse_limit("10/second") == (10, 1.0)
    assert parse_limit("5/10 seconds") == (5, 10.0)
    assert parse_limit("3 per hour") == (3, 3600.0)
    assert parse_limit("1/day") == (1, 86400.0)
    for bad in ("", "0/minute", "ten/second", "5/fortnight", "5"):
        with pytest.raises(ValueError, match="limit"):
            parse_limit(bad)


def test_bad_rules_fail_when_the_system_is_built() -> None:
    def build(rules: dict[str, Any]) -> System:
        config = Config(managers={"ratelimit": ManagerSection(options={"rules": rules})})
        return System(config, managers=[RatelimitManager])

    with pytest.raises(ConfigError, match=r"rules\.ip\.limit"):
        build({"ip": "lots/minute"})
    with pytest.raises(ConfigError, match=r"rules\.u\.algorithm"):
        build({"u": {"level": "user", "limit": "1/s", "algorithm": "leaky"}})
    with pytest.raises(ConfigError, match=r"rules\.u\.burst"):
        build({"u": {"limit": "1/s", "burst": "many"}})


# -- the algorithms' arithmetic, at chosen instants ----------------------------------------


def test_sliding_window_weights_the_previous_window() -> None:
    rule = Rule(name="r", level="ip", limit=10, period=10.0)
    # 10 calls in window 0; at t=15 (half-way through window 1) they weigh 5.
    verdict, state_ = sliding_window(rule, (0, 10, 0), 15.0, 1)
    assert not verdict.exceeded and verdict.remaining == 4 and state_ == (1, 1, 10)
    verdict, _ = sliding_window(rule, (1, 5, 10), 15.0, 1)
    assert verdict.exceeded and verdict.remaining == 0
    # 5 + 10 * w + 1 <= 10 once w <= 0.4, i.e. at t = 16.
    assert verdict.retry_after == pytest.approx(1.0)
    # Two windows later nothing is left of window 0.
    verdict, state_ = sliding_window(rule, (0, 10, 0), 20.0, 1)
    assert verdict.remaining == 9 and state_ == (2, 1, 0)


def test_gcra_arithmetic() -> None:
    rule = Rule(name="r", level="ip", limit=2, period=1.0, algorithm="token_bucket", burst=3)
    tat = None
    for left in (2, 1, 0):
        verdict, tat = token_bucket(rule, tat, 100.0, 1)
        assert not verdict.exceeded and verdict.remaining == left
    verdict, same = token_bucket(rule, tat, 100.0, 1)
    assert verdict.exceeded and same == tat and verdict.retry_after == pytest.approx(0.5)
    verdict, _ = token_bucket(rule, tat, 100.5, 1)
    assert not verdict.exceeded and verdict.remaining == 0


# -- each algorithm at its edges, on both backends ------------------------------------------


def test_sliding_window_edges(url: str) -> None:
    with limiter({"rules": {"ip": "3/hour"}}, url) as system:
        for left in (2, 1, 0):
            decision = system.ask(RatelimitCheck(ip="1.1.1.1"))
            assert decision.allowed and state(decision, "ip").remaining == left
        refused = system.ask(RatelimitCheck(ip="1.1.1.1"))
        assert not refused.allowed and refused.exceeded == ["ip"]
        assert 0 < refused.retry_after <= 2 * HOUR
        assert system.ask(RatelimitCheck(ip="2.2.2.2")).allowed  # another identifier
        # A cost larger than what is left is refused; what is left is not touched.
        assert system.ask(RatelimitCheck(ip="3.3.3.3", cost=2)).allowed
        assert not system.ask(RatelimitCheck(ip="3.3.3.3", cost=2)).allowed
        assert state(system.ask(RatelimitCheck(ip="3.3.3.3")), "ip").remaining == 0


def test_sliding_window_allows_again_after_retry_after(url: str, timeline: Timeline) -> None:
    options = {"rules": {"ip": "2/second"}, "local_cache": False}
    with limiter(options, url, timeline.clock) as system:
        while system.ask(RatelimitCheck(ip="a")).allowed:
            pass
        refused = system.ask(RatelimitCheck(ip="a"))
        assert not refused.allowed and 0 < refused.retry_after <= 2.0
        timeline.advance(refused.retry_after)
        assert system.ask(RatelimitCheck(ip="a")).allowed


def test_token_bucket_burst_then_rate(url: str) -> None:
    rules = {"user": {"limit": "1/hour", "algorithm": "token_bucket", "burst": 3}}
    with limiter({"rules": rules}, url) as system:
        for left in (2, 1, 0):
            decision = system.ask(RatelimitCheck(user="ada"))
            assert decision.allowed and state(decision, "user").remaining == left
            assert state(decision, "user").limit == 3
        refused = system.ask(RatelimitCheck(user="ada"))
        assert refused.exceeded == ["user"]
        assert HOUR - 5 < refused.retry_after <= HOUR  # one emission interval


def test_token_bucket_refills_at_its_rate(url: str, timeline: Timeline) -> None:
    rules = {"user": {"limit": "20/second", "algorithm": "token_bucket", "burst": 2}}
    with limiter({"rules": rules, "local_cache": False}, url, timeline.clock) as system:
        assert system.ask(RatelimitCheck(user="ada")).allowed
        assert system.ask(RatelimitCheck(user="ada")).allowed
        refused = system.ask(RatelimitCheck(user="ada"))
        assert not refused.allowed and 0 < refused.retry_after <= 0.05
        timeline.advance(refused.retry_after)
        assert system.ask(RatelimitCheck(user="ada")).allowed


# -- several levels in one check ------------------------------------------------------------

LEVELS = {
    "ip": "100/hour",
    "user": {"limit": "2/hour", "algorithm": "token_bucket"},
    "api_key": "50/hour",
    "tenant": {"level": "tenant", "limit": "10/hour"},
}


def test_one_exceeded_level_charges_none(url: str) -> None:
    call = RatelimitCheck(ip="9.9.9.9", user="bob", api_key="k-secret", identifiers={"tenant": "t"})
    with limiter({"rules": LEVELS, "local_cache": False}, url) as system:
        assert system.ask(call).allowed and system.ask(call).allowed
        refused = system.ask(call)
        assert not refused.allowed and refused.exceeded == ["user"]
        assert {s.rule: s.remaining for s in refused.rules} == {
            "ip": 98, "user": 0, "api_key": 48, "tenant": 8,
        }  # fmt: skip
        info = system.ask(
            RatelimitInfo(ip="9.9.9.9", api_key="k-secret", identifiers=call.identifiers)
        )
        assert {s.rule: s.remaining for s in info.rules} == {"ip": 98, "api_key": 48, "tenant": 8}
        # The other levels still have their allowance for other users.
        assert system.ask(RatelimitCheck(ip="9.9.9.9", user="eve")).allowed


def test_rules_limited_to_endpoints_and_per_endpoint(url: str) -> None:
    rules = {
        "search": {"level": "ip", "limit": "1/hour", "endpoints": ["/search*"]},
        "each": {"level": "ip", "limit": "2/hour", "per_endpoint": True},
    }
    with limiter({"rules": rules}, url) as system:
        first = system.ask(RatelimitCheck(ip="a", endpoint="/search"))
        assert first.allowed and sorted(s.rule for s in first.rules) == ["each", "search"]
        assert system.ask(RatelimitCheck(ip="a", endpoint="/search")).exceeded == ["search"]
        assert system.ask(RatelimitCheck(ip="a", endpoint="/items")).allowed
        assert system.ask(RatelimitCheck(ip="a", endpoint="/items")).allowed
        assert system.ask(RatelimitCheck(ip="a", endpoint="/items")).exceeded == ["each"]
        assert system.ask(RatelimitReset(level="ip", identifier="a", endpoint="/items")).removed
        assert system.ask(RatelimitCheck(ip="a", endpoint="/items")).allowed
        with pytest.raises(NotFound):
            system.ask(RatelimitReset(level="ip", identifier="a", rule="nope"))


def test_keys_share_the_identifiers_hash_tag_and_hide_api_keys(redis_server: RedisServer) -> None:
    with limiter({"rules": LEVELS}, redis_server.url) as system:
        system.ask(RatelimitCheck(ip="9.9.9.9", api_key="k-secret"))
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    keys = sorted(str(key) for key in client.keys("*"))
    assert keys[1] == "corral:{rl:ip:9.9.9.9}:ip"
    assert keys[0].startswith("corral:{rl:api_key:") and "k-secret" not in keys[0]
    assert len(keys) == 2  # no ban or refusal keys until there is a ban or a refusal
    assert all(0 < client.pttl(k) <= 2 * HOUR * 1000 + 1000 for k in keys)


# -- bans ----------------------------------------------------------------------------------


def test_ban_and_unban(url: str, timeline: Timeline) -> None:
    with limiter({"rules": {"ip": "5/hour"}}, url, timeline.clock) as system:
        banned = system.ask(RatelimitBan(level="ip", identifier="6.6.6.6", duration=600))
        assert banned.until is not None and banned.until > time.time() + 590
        refused = system.ask(RatelimitCheck(ip="6.6.6.6", user="anyone"))
        assert not refused.allowed and refused.banned == ["ip"] and refused.exceeded == []
        assert 590 < refused.retry_after <= 600
        assert refused.headers()["Retry-After"] in {"599", "600"}
        assert system.ask(RatelimitUnban(level="ip", identifier="6.6.6.6")).removed == 1
        after = system.ask(RatelimitCheck(ip="6.6.6.6"))
        assert after.allowed and state(after, "ip").remaining == 4  # the ban charged nothing
        # A ban on a level with no rules still refuses; a short ban runs out.
        system.ask(RatelimitBan(level="user", identifier="mallory", duration=0.1))
        assert system.ask(RatelimitCheck(ip="1.1.1.1", user="mallory")).banned == ["user"]
        timeline.advance(0.15)
        assert system.ask(RatelimitCheck(ip="1.1.1.1", user="mallory")).allowed
        with pytest.raises(InvalidMessage):
            system.ask(RatelimitBan(level="ip", identifier="x", duration=-1))


def test_endless_ban(url: str) -> None:
    with limiter({"rules": {"ip": "5/hour"}}, url) as system:
        assert system.ask(RatelimitBan(level="ip", identifier="x")).until is None
        assert system.ask(RatelimitCheck(ip="x")).banned == ["ip"]


def test_auto_ban_after_n_refusals(url: str) -> None:
    options = {"rules": {"ip": "1/hour"}, "ban_after": 3, "ban_duration": 60, "local_cache": False}
    with limiter(options, url) as system:
        assert system.ask(RatelimitCheck(ip="bot")).allowed
        assert system.ask(RatelimitCheck(ip="bot")).banned == []
        assert system.ask(RatelimitCheck(ip="bot")).banned == []
        third = system.ask(RatelimitCheck(ip="bot"))
        assert third.banned == ["ip"] and third.retry_after > 55  # the ban or the rule, later
        assert system.ask(RatelimitCheck(ip="bot")).banned == ["ip"]
        assert system.ask(RatelimitCheck(ip="human")).allowed
        system.ask(RatelimitUnban(level="ip", identifier="bot"))
        again = system.ask(RatelimitCheck(ip="bot"))
        assert again.banned == [] and again.exceeded == ["ip"]


def test_refusals_served_from_the_local_cache_count_towards_auto_ban(
    redis_server: RedisServer, clock: ManualClock
) -> None:
    options = {"rules": {"ip": "1/hour"}, "ban_after": 4, "local_cache_ttl": 0.05}
    with limiter(options, redis_server.url, clock) as system:
        assert system.ask(RatelimitCheck(ip="bot")).allowed
        for _ in range(3):  # one refusal from Redis, then from the cache
            assert system.ask(RatelimitCheck(ip="bot")).exceeded == ["ip"]
        metrics = system.ask(HealthCheck(target="ratelimit")).metrics
        assert metrics["cached_refusals"] == 2
        clock.advance(0.06)  # the local cache's entry ends; Redis keeps the rule's refusal
        assert system.ask(RatelimitCheck(ip="bot")).banned == ["ip"]


@pytest.mark.parametrize("layout", ["", "#cluster"])
def test_the_local_cache_only_refuses_so_processes_sharing_redis_never_over_admit(
    redis_server: RedisServer, layout: str
) -> None:
    """Each System stands for a daemon with its own local cache, on one Redis: the cache
    holds refusals only (a rule used up, a ban), so however the calls are spread, no more
    are allowed than the limit."""
    rules = {"ip": "5/hour", "user": {"limit": "4/hour", "algorithm": "token_bucket"}}
    options = {"rules": rules, "ban_after": 100, "local_cache_ttl": 60.0}
    url = redis_server.url + layout
    with (
        limiter(options, url) as one,
        limiter(options, url) as two,
        limiter(options, url) as three,
    ):
        systems = [one, two, three]
        allowed = {"ip": 0, "user": 0}
        for n in range(30):
            system = systems[n % 3]
            allowed["ip"] += system.ask(RatelimitCheck(ip="shared")).allowed
            allowed["user"] += system.ask(RatelimitCheck(user="shared")).allowed
        assert allowed == {"ip": 5, "user": 4}
        for system in systems:
            assert system.ask(HealthCheck(target="ratelimit")).metrics["cached_refusals"] > 0


# -- headers -------------------------------------------------------------------------------


def test_headers(url: str) -> None:
    rules = {"ip": "3/hour", "user": {"limit": "10/hour", "algorithm": "token_bucket"}}
    with limiter({"rules": rules}, url) as system:
        before = time.time()
        headers = system.ask(RatelimitCheck(ip="h", user="u")).headers()
        assert headers["X-RateLimit-Limit"] == "3" and headers["X-RateLimit-Remaining"] == "2"
        assert before < int(headers["X-RateLimit-Reset"]) <= math.ceil(before + 2 * HOUR) + 1
        assert "Retry-After" not in headers
        system.ask(RatelimitCheck(ip="h", user="u"))
        system.ask(RatelimitCheck(ip="h", user="u"))
        refused = system.ask(RatelimitCheck(ip="h", user="u"))
        headers = refused.headers()
        assert headers["X-RateLimit-Remaining"] == "0" and headers["X-RateLimit-Limit"] == "3"
        assert headers["Retry-After"] == str(math.ceil(refused.retry_after))
        # The user's bucket was charged three times, not four.
        assert state(refused, "user").remaining == 7


# -- Redis down ----------------------------------------------------------------------------

MODES = {
    "open": {"level": "ip", "limit": "1/hour", "on_backend_error": "open"},
    "closed": {"level": "user", "limit": "100/hour", "on_backend_error": "closed"},
    "local": {"level": "api_key", "limit": "2/hour", "on_backend_error": "local"},
}


def test_redis_down_each_mode(fresh_redis_server: RedisServer, clock: ManualClock) -> None:
    options = {"rules": MODES, "retry_interval": 0.05}
    with limiter(options, fresh_redis_server.url, clock) as system:
        assert system.ask(RatelimitCheck(ip="a", user="u", api_key="k")).allowed
        assert system.health().managers["ratelimit"].status == "healthy"
        fresh_redis_server.kill()

        # fail open: the ip rule (already used up in Redis) allows.
        opened = system.ask(RatelimitCheck(ip="a"))
        assert opened.allowed and opened.degraded and state(opened, "open").remaining == 1
        # fail closed: the user rule refuses.
        closed = system.ask(RatelimitCheck(user="u"))
        assert not closed.allowed and closed.exceeded == ["closed"] and closed.retry_after > 0
        # local: counted in this process, from zero: two allowed, then refused.
        assert system.ask(RatelimitCheck(api_key="k")).allowed
        assert system.ask(RatelimitCheck(api_key="k")).allowed
        local = system.ask(RatelimitCheck(api_key="k"))
        assert not local.allowed and local.exceeded == ["local"] and local.degraded
        # A closed rule refusing charges the local one nothing.
        assert not system.ask(RatelimitCheck(user="u", api_key="other")).allowed
        assert system.ask(RatelimitCheck(api_key="other")).allowed

        health = system.health().managers["ratelimit"]
        assert health.status == "degraded" and health.health is not None
        assert health.health.dependencies == {"redis": "down"}
        with pytest.raises(BackendUnavailable):
            system.ask(RatelimitBan(level="ip", identifier="a", duration=5))
        # The ban still holds in this process while Redis is away.
        assert system.ask(RatelimitCheck(ip="a")).banned == ["ip"]

        fresh_redis_server.start()  # empty: no persistence
        clock.advance(0.06)  # past retry_interval: Redis is tried again
        back = system.ask(RatelimitCheck(ip="b"))
        assert back.allowed and not back.degraded
        assert system.health().managers["ratelimit"].status == "healthy"


def test_waiting_checks_share_one_round_trip(fresh_redis_server: RedisServer) -> None:
    options = {"rules": {"ip": "3/hour"}, "redis_timeout": 10.0, "local_cache": False}
    with limiter(options, fresh_redis_server.url) as system:
        system.ask(RatelimitCheck(ip="warm-up"))
        decisions: list[RatelimitDecision] = []

        def ask() -> None:
            decisions.append(system.ask(RatelimitCheck(ip="a"), timeout=20))

        fresh_redis_server.pause()  # the first check waits on Redis; the others queue up
        try:
            threads = [threading.Thread(target=ask) for _ in range(6)]
            threads[0].start()
            wait_until(lambda: mailbox_depth(system, "ratelimit") == 0)
            for thread in threads[1:]:
                thread.start()
            wait_until(lambda: mailbox_depth(system, "ratelimit") == 5)
        finally:
            fresh_redis_server.resume()
        for thread in threads:
            thread.join()
        assert sum(d.allowed for d in decisions) == 3 and len(decisions) == 6
        metrics = system.ask(HealthCheck(target="ratelimit")).metrics
        assert metrics["batched_checks"] >= 4  # (a liveness probe may cut a batch short)
        assert metrics["batches"] <= 2


def test_redis_down_at_start_then_up(fresh_redis_server: RedisServer, clock: ManualClock) -> None:
    fresh_redis_server.stop()
    options = {"rules": {"ip": {"limit": "5/hour", "on_backend_error": "closed"}}}
    with limiter({**options, "retry_interval": 0.05}, fresh_redis_server.url, clock) as system:
        assert system.ask(RatelimitCheck(ip="a")).exceeded == ["ip"]
        fresh_redis_server.start()
        clock.advance(0.06)
        assert system.ask(RatelimitCheck(ip="a")).allowed  # the scripts are loaded on demand


def test_cost_must_be_positive() -> None:
    with limiter({"rules": {"ip": "5/hour"}}) as system:
        with pytest.raises(InvalidMessage, match="cost"):
            system.ask(RatelimitCheck(ip="a", cost=0))
        assert system.ask(RatelimitInfo(ip="a", cost=0)).allowed


def test_messages_cross_the_wire() -> None:
    codec = Codec()
    check = RatelimitCheck(ip="a", user="u", endpoint="/x", identifiers={"tenant": "t"}, cost=2)
    assert codec.decode(codec.encode(check)).message == check
    with limiter({"rules": {"ip": "1/hour"}}) as system:
        system.ask(RatelimitCheck(ip="a"))
        decision = system.ask(RatelimitCheck(ip="a"))
    copy = codec.decode(codec.encode(decision)).message
    assert copy == decision and isinstance(copy, RatelimitDecision)
    assert copy.headers() == decision.headers()
