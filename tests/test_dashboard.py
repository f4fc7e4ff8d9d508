"""The dashboard: its figures, samples and events, the token, what daemons share through
Redis, and headless Chromium watching two real daemons serve traffic."""

from __future__ import annotations

import base64
import itertools
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis

import corral
from corral._redis import connect
from corral._wire import alive_key
from corral.config import BusSection, Config, DaemonSection, ManagerSection
from corral.daemon import Daemon
from corral.dashboard import STATUS_INTERVAL
from corral.dashboard._events import EVENTS_KEPT, Cursor, RecentEvents
from corral.dashboard._figures import figures
from corral.dashboard._series import Series
from corral.dashboard._shared import STATUS_TTL, events_key, status_key
from corral.errors import CorralError
from corral.messages.cache import CacheGet, CacheSet
from corral.messages.ratelimit import RatelimitCheck
from corral.messages.state import StateChanged, StateRegister
from corral.messages.system import (
    ChildStatus,
    Health,
    HealthChanged,
    SupervisorChildChanged,
    SystemHealth,
)
from corral.messages.transaction import TransactionBegin, TransactionRollback
from tests.browser import DevTools
from tests.daemons import DaemonGroup, redis_daemons_config
from tests.redis_server import RedisServer
from tests.support import Work, run_corral, wait_until

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
"""Where the browser test leaves its screenshots (ignored by git)."""

TOKEN = "dashboard-token-for-tests"


def memory_daemon(token: str = "") -> Daemon:
    return Daemon(
        Config().replace(
            daemon=DaemonSection(port=0, dashboard_token=token),
            managers={"cache": ManagerSection(class_path="corral.actors.cache:CacheManager")},
        )
    )


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    with memory_daemon() as running:
        yield running


# -- the page -------------------------------------------------------------------------------


def test_the_page_and_the_login_form_load_nothing_from_elsewhere(daemon: Daemon) -> None:
    page = httpx.get(daemon.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    with memory_daemon(TOKEN) as guarded:
        login = httpx.get(guarded.url + "/")
    assert login.status_code == 401 and 'action="/dashboard/login"' in login.text
    for response in (page, login):
        policy = response.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "connect-src 'self'" in policy
        assert "frame-ancestors 'none'" in policy
    for text in (page.text, login.text):
        for external in ("src=", "href=", "@import", "url("):
            assert external not in text
        urls = {word for word in text.replace('"', " ").split() if "://" in word}
        assert urls <= {"http://www.w3.org/2000/svg"}  # the SVG namespace, loaded from nowhere


# -- figures, samples, events ---------------------------------------------------------------


def test_each_built_in_manager_shows_its_own_figures() -> None:
    def shown(kind: str, details: dict[str, Any], metrics: dict[str, Any]) -> dict[str, str]:
        return {f["label"]: f["value"] + (f" ({f['tone']})" if f["tone"] else "") for f in
                figures(kind, details, metrics)}  # fmt: skip

    cache = {"cache_hits": 90, "cache_misses": 10, "cache_size": 7, "cache_evictions": 0}
    assert shown("cache", {}, cache) == {"hit rate": "90.0%", "size": "7", "evictions": "0"}
    assert shown("cache", {}, {"cache_hits": 0, "cache_misses": 0})["hit rate"] == "no lookups yet"
    assert shown("ratelimit", {}, {"checks": 0, "refused": 0})["refusals"] == "0"
    limits = {"checks": 200, "refused": 50, "backend_errors": 1}
    assert shown("ratelimit", {}, limits) == {
        "refusals": "50 (25.0%)", "checks": "200", "backend errors": "1 (bad)"
    }  # fmt: skip
    breakers = {
        "billing": {"urls": {"http://a": {"breaker": "open"}, "http://b": {"breaker": "closed"}}},
        "search": {"urls": {"http://c": {"breaker": "half_open"}}},
        "mail": {"urls": {"http://d": {"breaker": "closed"}}},
    }
    assert shown("pool", breakers, {"billing.in_flight": 3}) == {
        "billing breakers": "1 of 2 open (bad)",
        "billing in flight": "3",
        "mail breakers": "1 closed",
        "search breakers": "1 of 1 half-open (warn)",
    }
    assert shown("websocket", {}, {"connections": 1200, "rooms": 3})["open sockets"] == "1,200"
    assert shown("transaction", {}, {"open": 4, "committed": 9})["open"] == "4"
    own = {"handled": 5, "uptime_s": 3.0, "jobs": 12, "ratio": 0.25, "ok": True}
    assert shown("billing", {}, own) == {"jobs": "12", "ratio": "0.25"}
    assert shown("cache", {}, {}) == {}  # what a manager does not report is left out


def _health(handled: dict[str, int], depth: int = 0) -> SystemHealth:
    return SystemHealth(
        status="healthy",
        managers={
            name: ChildStatus(
                name=name,
                state="running",
                status="healthy",
                critical=False,
                restarts=0,
                last_error=None,
                mailbox_depth=depth,
                uptime_s=1.0,
                health=Health(status="healthy", metrics={"handled": count}),
            )
            for name, count in handled.items()
        },
    )


def test_series_keep_15_minutes_of_rates_and_depths_in_a_ring() -> None:
    series = Series(window=20.0, step=5.0)  # four samples
    series.sample(100.0, _health({"cache": 0}))
    series.sample(105.0, _health({"cache": 50}, depth=3))
    assert series.latest_rate("cache") == 10.0
    series.sample(110.0, _health({"cache": 20, "state": 7}))  # cache restarted: counts from 0
    series.sample(115.0, _health({"cache": 30, "state": 17}))
    series.sample(120.0, _health({"cache": 30, "state": 17}))
    document = series.document()
    assert document["t"] == [105.0, 110.0, 115.0, 120.0]
    assert document["managers"]["cache"] == {"rate": [10.0, 4.0, 2.0, 0.0], "depth": [3, 0, 0, 0]}
    assert document["managers"]["state"] == {"rate": [None, None, 2.0, 0.0],
                                              "depth": [None, 0, 0, 0]}  # fmt: skip
    assert json.loads(json.dumps(document)) == document


def _state_changed(n: int) -> StateChanged:
    return StateChanged(
        state_id=str(n), state_type="order", transition="update", old=None, new={"n": n},
        version=n + 1, offset=n, epoch="e", ts=0,
    )  # fmt: skip


def test_a_flood_of_state_changes_never_pushes_out_a_restart() -> None:
    events = RecentEvents("d1")
    failed = SupervisorChildChanged(child="cache", change="failed", reason="x" * 1000)
    events.record("supervisor.child.failed", failed)
    events.record("health.changed", HealthChanged(status="degraded", previous="healthy"))
    for n in range(EVENTS_KEPT * 5):
        events.record(f"state.changed.order.{n}", _state_changed(n))
    events.record("ws.room.lobby", failed)  # not a topic the dashboard shows

    found, cursor = events.since(Cursor())
    kinds = [event["kind"] for event in found]
    assert (kinds.count("supervisor"), kinds.count("health")) == (1, 1)
    assert kinds.count("state") == EVENTS_KEPT
    restart = next(event for event in found if event["kind"] == "supervisor")
    assert restart["daemon"] == "d1" and restart["topic"] == "supervisor.child.failed"
    assert restart["fields"]["child"] == "cache"
    assert len(restart["fields"]["reason"]) == 301  # cut, with an ellipsis
    assert found[-1]["fields"]["state_id"] == str(EVENTS_KEPT * 5 - 1)

    assert events.since(cursor) == ([], cursor)
    restarted = SupervisorChildChanged(child="cache", change="restarted")
    events.record("supervisor.child.restarted", restarted)
    later, after = events.since(Cursor.parse(str(cursor)))
    assert [event["topic"] for event in later] == ["supervisor.child.restarted"]
    assert after["state"] == cursor["state"]


@pytest.mark.parametrize("text", ["nope:1", "state:1;DROP", "state:", "health:1-2-3"])
def test_a_bad_cursor_is_refused(daemon: Daemon, text: str) -> None:
    response = httpx.get(f"{daemon.url}/dashboard/api/events", params={"cursor": text})
    assert response.status_code == 400
    assert "not a position in the events" in response.json()["error"]


def test_a_memory_daemon_shows_itself_its_samples_and_its_events(daemon: Daemon) -> None:
    for n in range(20):
        daemon.system.ask(CacheSet(key=f"k{n}", value="v"))
        daemon.system.ask(CacheGet(key=f"k{n % 10}"))
    daemon.system.publish("supervisor.child.failed", SupervisorChildChanged(
        child="cache", change="failed", reason="boom"))  # fmt: skip
    api = f"{daemon.url}/dashboard/api"

    def probed() -> dict[str, Any]:  # the figures come with the supervisor's next probe
        (found,) = httpx.get(f"{api}/daemons").json()["daemons"]
        size = {"label": "size", "value": "20", "tone": ""}
        return found if size in found["managers"]["cache"]["figures"] else {}

    shown = wait_until(probed, timeout=10)
    assert shown["status"] == "healthy" and shown["bus"] == {"backend": "memory", "healthy": True}
    cache = shown["managers"]["cache"]
    assert cache["kind"] == "cache" and cache["state"] == "running"
    assert {"label": "hit rate", "value": "100.0%", "tone": ""} in cache["figures"]

    series = httpx.get(f"{api}/series").json()
    assert set(series["daemons"]) == {shown["id"]} and series["window"] == 900.0
    assert series["daemons"][shown["id"]]["t"]  # sampled at once

    events = httpx.get(f"{api}/events").json()
    topics = [(event["daemon"], event["topic"]) for event in events["events"]]
    assert (shown["id"], "supervisor.child.failed") in topics
    assert (shown["id"], "supervisor.child.started") in topics
    assert httpx.get(f"{api}/events", params={"cursor": events["cursor"]}).json()["events"] == []


# -- the token ------------------------------------------------------------------------------


def test_with_a_token_the_page_and_its_endpoints_want_it() -> None:
    with memory_daemon(TOKEN) as running:
        url = running.url
        endpoints = ["/dashboard/api/daemons", "/dashboard/api/series", "/dashboard/api/events"]
        page = httpx.get(url + "/")
        assert page.status_code == 401 and 'name="token"' in page.text
        for path in endpoints:
            refused = httpx.get(url + path)
            assert refused.status_code == 401 and "token" in refused.json()["error"]
            wrong = httpx.get(url + path, headers={"Authorization": f"Bearer {TOKEN}x"})
            assert wrong.status_code == 401
            assert httpx.get(url + path, headers={"Authorization": f"Bearer {TOKEN}"}).is_success
        assert httpx.get(url + "/", cookies={"corral_dashboard": TOKEN[:-1]}).status_code == 401

        with httpx.Client(base_url=url) as browser:
            wrong_login = browser.post("/dashboard/login", data={"token": "guess-guess-guess"})
            assert wrong_login.status_code == 401 and "not the dashboard's" in wrong_login.text
            login = browser.post("/dashboard/login", data={"token": TOKEN})
            assert login.status_code == 303 and login.headers["location"] == "/"
            cookie = login.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
            assert browser.get("/").status_code == 200
            assert browser.get("/dashboard/api/daemons").json()["login"] is True
            assert browser.post("/dashboard/logout").status_code == 303
            assert browser.get("/dashboard/api/daemons").status_code == 401

        for probe in ("/livez", "/readyz", "/health", "/metrics"):  # probes and scrapes stay open
            assert httpx.get(url + probe).status_code == 200


def test_without_a_token_a_daemon_refuses_to_listen_beyond_loopback() -> None:
    result = run_corral("run", "--host", "0.0.0.0")
    assert result.returncode == 2
    assert "daemon.dashboard_token: required when daemon.host is not a loopback address" in (
        result.stderr
    )


# -- what daemons share through Redis -------------------------------------------------------


def daemon_id(daemon: Daemon) -> str:
    """The id a daemon on Redis goes by among the daemons of its namespace."""
    assert daemon.remote is not None
    return daemon.remote.daemon_id


def redis_daemon(url: str, namespace: str) -> Daemon:
    return Daemon(
        Config().replace(
            bus=BusSection(backend="redis", url=url, namespace=namespace),
            daemon=DaemonSection(port=0),
            managers={"cache": ManagerSection(class_path="corral.actors.cache:CacheManager")},
        )
    )


@pytest.mark.parametrize("topology", ["standalone", "cluster"])
def test_daemons_share_their_status_samples_and_events_through_redis(
    topology: str, request: pytest.FixtureRequest
) -> None:
    fixture = "redis_server" if topology == "standalone" else "redis_cluster"
    url: str = request.getfixturevalue(fixture).url
    namespace = f"dash{uuid.uuid4().hex[:8]}"
    client: Any = connect(url)
    request.addfinalizer(client.close)
    with (
        redis_daemon(url, namespace) as first,
        redis_daemon(url, namespace) as second,
    ):
        ids = {daemon_id(first), daemon_id(second)}
        key = status_key(namespace, daemon_id(second))
        wait_until(lambda: client.hget(key, "status") and client.hget(key, "series"), timeout=10)
        assert 0 < client.pttl(key) <= STATUS_TTL * 1000
        shared = json.loads(client.hget(key, "status"))
        assert shared["id"] == daemon_id(second)
        assert set(shared["managers"]) == {"system", "cache"}
        assert shared["bus"] == {"backend": "redis", "healthy": True}

        api = f"{first.url}/dashboard/api"
        daemons = wait_until(
            lambda: (
                (found := httpx.get(f"{api}/daemons").json()["daemons"])
                and {d["id"] for d in found} == ids
                and found
            ),
            timeout=10,
        )
        assert all(not d.get("missing") for d in daemons)
        assert set(httpx.get(f"{api}/series").json()["daemons"]) == ids

        second.system.publish("supervisor.child.failed", SupervisorChildChanged(
            child="cache", change="failed", reason="on the second"))  # fmt: skip
        stream = events_key(namespace, "supervisor")

        def relayed() -> bool:
            entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(stream))
            return any(b"on the second" in fields[b"e"] for _, fields in entries)

        wait_until(relayed, timeout=5)

        def seen_on_first() -> list[dict[str, Any]]:
            events = httpx.get(f"{api}/events").json()["events"]
            return [e for e in events if e["fields"].get("reason") == "on the second"]

        (event,) = wait_until(seen_on_first, timeout=5)
        assert event["daemon"] == daemon_id(second)
        started = {e["daemon"] for e in httpx.get(f"{api}/events").json()["events"]
                   if e["topic"] == "supervisor.child.started"}  # fmt: skip
        assert started == ids
        written = json.loads(client.hget(key, "status"))["updated"]
        wait_until(  # the status written once more: a stop must take even a fresh one with it
            lambda: json.loads(client.hget(key, "status"))["updated"] > written,
            timeout=STATUS_INTERVAL + 5,
        )
    assert client.exists(key) == 0  # a daemon that stops takes its status with it
    assert client.xlen(stream) > 0  # the events stay, capped


def test_junk_in_the_dashboard_keys_is_skipped(redis_server: RedisServer) -> None:
    namespace = f"dash{uuid.uuid4().hex[:8]}"
    with redis.Redis.from_url(redis_server.url) as client:
        client.zadd(alive_key(namespace, "supervisor"), {"forged": 2**50, "quiet": 2**50})
        client.hset(status_key(namespace, "forged"), "status", b"\xff not json")
        stream = events_key(namespace, "supervisor")
        for junk in (b"\xff", b"[1, 2]", json.dumps({"topic": "x", "ts": "soon"}).encode()):
            client.xadd(stream, {"e": junk})
    with redis_daemon(redis_server.url, namespace) as running:
        api = f"{running.url}/dashboard/api"
        shown = {d["id"]: d for d in httpx.get(f"{api}/daemons").json()["daemons"]}
        assert shown["forged"]["missing"] is True and shown["quiet"]["missing"] is True
        assert shown[daemon_id(running)]["managers"]

        def started() -> list[dict[str, Any]]:
            events: list[dict[str, Any]] = httpx.get(f"{api}/events").json()["events"]
            return events

        events = wait_until(started, timeout=5)
        assert {event["topic"] for event in events} == {"supervisor.child.started"}


# -- headless Chromium and two real daemons -------------------------------------------------


OVERLAPS = (Path(__file__).parent / "layout_overlaps.js").read_text()
"""A script that lists the elements of a page that overlap or stick out (see its comment)."""

OVERLAPPING_PAGE = """<!doctype html><body style="margin:0">
<main style="display:grid; grid-template-columns:300px 300px">
  <section id="left"><table><tr><td style="white-space:nowrap">RuntimeError: a last error
    far too long for its column, running over the events</td></tr></table></section>
  <section id="right">events</section>
</main>
<div id="narrow" style="width:40px; white-space:nowrap">unbreakable-words-wider-than-it</div>
<div style="position:relative; height:40px">
  <span id="one" style="position:absolute; left:0; width:50px">one</span>
  <span id="two" style="position:absolute; left:20px; width:50px">two</span>
</div>
</body>"""


def test_the_layout_check_finds_overlaps_overflows_and_elements_sticking_out(
    browser: DevTools,
) -> None:
    page = "data:text/html;base64," + base64.b64encode(OVERLAPPING_PAGE.encode()).decode()
    browser.resize(1280, 600)
    browser.call("Page.navigate", url=page)
    wait_until(lambda: browser.evaluate("!!document.getElementById('two')"), timeout=10)
    problems = "\n".join(browser.evaluate(OVERLAPS)["problems"])
    assert "table [0," in problems and "sticks out of section#left" in problems
    assert "div#narrow" in problems and "its content is wider than it" in problems
    assert "span#one [0," in problems and "overlaps span#two" in problems


DAEMONS_CONFIG = """
[managers.worker]
class_path = "tests.support:Worker"
[managers.cache]
[managers.state]
[managers.transaction]
depends_on = ["state"]
[managers.ratelimit.rules]
ip = "40/minute"
"""


def _traffic(url: str, namespace: str, stop: threading.Event) -> None:
    """Requests of every kind, with one that crashes the worker now and then."""
    with corral.connect(url, namespace=namespace) as client:
        for n in itertools.count():
            if stop.is_set():
                return
            try:
                client.ask(CacheSet(key=f"k{n % 40}", value="v"))
                client.ask(CacheGet(key=f"k{n % 50}"))
                client.ask(RatelimitCheck(ip=f"10.0.0.{n % 3}"))
                client.ask(Work())
                if n % 5 == 0:
                    client.ask(StateRegister(state_id=f"order-{n}", state_type="order"))
                    opened = client.ask(TransactionBegin())
                    client.ask(TransactionRollback(transaction_id=opened.transaction_id))
                if n % 40 == 7:  # a new poison request each time: never quarantined
                    client.ask(Work(action="crash", seconds=n / 1000), timeout=10)
            except CorralError:  # ManagerUnavailable from the crash, mostly
                pass
            stop.wait(0.02)


def test_chromium_sees_both_daemons_the_plots_and_the_restarts_without_overlaps(
    redis_server: RedisServer, tmp_path: Path, browser: DevTools
) -> None:
    namespace = f"dash{uuid.uuid4().hex[:8]}"
    config = redis_daemons_config(
        redis_server.url, namespace, DAEMONS_CONFIG, extra=f'dashboard_token = "{TOKEN}"'
    )
    stop = threading.Event()
    with DaemonGroup(tmp_path, config, count=2) as group:
        traffic = threading.Thread(target=_traffic, args=(redis_server.url, namespace, stop))
        traffic.start()
        try:
            ids = {group[0].daemon_id, group[1].daemon_id}
            browser.resize(1280, 900)
            browser.call("Page.navigate", url=group[0].http_url + "/")
            wait_until(lambda: browser.evaluate("!!document.getElementById('token')"), timeout=10)
            browser.evaluate(
                f"document.getElementById('token').value = {TOKEN!r};"
                "document.getElementById('login').submit()"
            )
            shown = "[...document.querySelectorAll('#daemons .daemon')].map(d => d.dataset.daemon)"
            wait_until(lambda: set(browser.evaluate(shown) or []) == ids, timeout=20)
            rows = "document.querySelectorAll('#daemons tr[data-manager=\"cache\"]').length"
            assert browser.evaluate(rows) == 2

            lines = (  # of two samples at least: a line, not a dot
                "[...document.querySelectorAll('#chart-rate-cache path.line')]"
                ".filter(p => p.getAttribute('d').includes('L')).map(p => p.dataset.daemon)"
            )
            wait_until(lambda: set(browser.evaluate(lines) or []) == ids, timeout=40)
            depth = "document.querySelectorAll('#chart-depth-worker path.line').length"
            assert browser.evaluate(depth) == 2
            marks = (
                "[...document.querySelectorAll('#timeline-plot .mark')]"
                ".map(m => m.closest('.lane').dataset.manager + ' ' + m.dataset.change)"
            )
            found = wait_until(lambda: browser.evaluate(marks), timeout=30)
            assert {"worker failed", "worker restarted"} <= set(found)
            daemons_in_events = (
                "new Set([...document.querySelectorAll('#events li')].map(li => li.dataset.daemon))"
                ".size"
            )
            assert browser.evaluate(daemons_in_events) == 2
            figures_shown = "document.querySelector('#daemons tr[data-manager=\"cache\"] .fig')"
            assert browser.evaluate(f"{figures_shown}.textContent").startswith("hit rate")
        finally:
            stop.set()
            traffic.join(30)

        ARTIFACTS.mkdir(exist_ok=True)
        for width in (1280, 1400, 1920):  # 1400: where the last errors once ran over the events
            browser.resize(width, 1000)
            wait_until(lambda: browser.evaluate("innerWidth") == width)  # noqa: B023
            layout = browser.evaluate(OVERLAPS)
            assert layout["checked"] > 200
            assert layout["problems"] == [], f"at {width} px: {layout['problems'][:10]}"
            screenshot = ARTIFACTS / f"dashboard-{width}.png"
            browser.screenshot(screenshot)
            assert screenshot.stat().st_size > 50_000
            print(f"screenshot at {width} px: {screenshot}")
