"""Pool discovery against real parts: instances announced in a real Redis by another
system, and names resolved by a real DNS server (dnspython answering on a UDP socket)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dns.message
import dns.rrset
import pytest
import redis
import trustme
from aiohttp import web

from corral.actors.pool import PoolManager
from corral.actors.pool._discovery import registry_key
from corral.config import BusSection, Config, ManagerSection
from corral.errors import BackendUnavailable, InvalidMessage, ManagerUnavailable
from corral.messages.pool import HttpRequest, PoolAnnounce, PoolWithdraw
from corral.messages.system import HealthCheck
from corral.system import System
from tests.redis_server import RedisServer
from tests.support import wait_until

NAMESPACE = "discovery"


class Instances:
    """aiohttp servers that answer with where they listen and the Host header they got."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []

    def serve(self, host: str, port: int = 0, tls: ssl.SSLContext | None = None) -> int:
        """Listen on ``host:port`` (0: any free port); the port."""
        return int(
            asyncio.run_coroutine_threadsafe(self._serve(host, port, tls), self.loop).result(10)
        )

    async def _serve(self, host: str, port: int, tls: ssl.SSLContext | None) -> int:
        app = web.Application()
        app.router.add_get("/where", _where)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=tls)
        await site.start()
        self.runners.append(runner)
        server: Any = site._server
        return int(server.sockets[0].getsockname()[1])

    def close(self) -> None:
        for runner in self.runners:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


async def _where(request: web.Request) -> web.Response:
    assert request.transport is not None
    address, port = request.transport.get_extra_info("sockname")[:2]
    return web.json_response({"at": f"{address}:{port}", "host": request.headers["Host"]})


@pytest.fixture
def instances() -> Iterator[Instances]:
    servers = Instances()
    yield servers
    servers.close()


@contextmanager
def pool(redis_url: str = "", **service: Any) -> Iterator[System]:
    options = {"services": {"billing": {"discovery_interval": 0.05, **service}}}
    bus = BusSection(backend="redis", url=redis_url, namespace=NAMESPACE) if redis_url else None
    config = Config().replace(managers={"pool": ManagerSection(options=options)})
    if bus is not None:
        config = config.replace(bus=bus)
    with System(config, managers=[PoolManager]) as system:
        yield system


def where(system: System) -> str:
    answer = system.ask(HttpRequest(service="billing", path="/where"), timeout=10)
    assert answer.status == 200
    return str(answer.json()["at"])


def answered_by(system: System, calls: int = 6) -> set[str]:
    """Where ``calls`` calls in a row were answered (round robin visits every instance);
    ``none`` for a call no instance answered."""
    found = set()
    for _ in range(calls):
        try:
            found.add(where(system))
        except BackendUnavailable:
            found.add("none")
    return found


# -- the registry ---------------------------------------------------------------------------


def test_instances_announced_by_another_system_come_and_go(
    redis_server: RedisServer, instances: Instances
) -> None:
    first, second, third = (instances.serve("127.0.0.1") for _ in range(3))
    url = {port: f"http://127.0.0.1:{port}" for port in (first, second, third)}
    with (
        pool(redis_server.url, discovery="registry", retry_attempts=1) as caller,
        pool(redis_server.url, discovery="registry") as announcer,
    ):
        with pytest.raises(BackendUnavailable, match=r"no instance found \(registry discovery\)"):
            where(caller)
        announced = announcer.ask(PoolAnnounce(service="billing", url=url[first], ttl=30))
        assert announced.instances == 1
        wait_until(lambda: answered_by(caller) == {f"127.0.0.1:{first}"})
        assert announcer.ask(PoolAnnounce(service="billing", url=url[second])).instances == 2
        wait_until(lambda: answered_by(caller) == {f"127.0.0.1:{first}", f"127.0.0.1:{second}"})

        assert announcer.ask(PoolWithdraw(service="billing", url=url[first])).instances == 1
        wait_until(lambda: answered_by(caller) == {f"127.0.0.1:{second}"})

        # One that stops announcing itself drops out when its time to live runs out.
        announcer.ask(PoolAnnounce(service="billing", url=url[third], ttl=0.5))
        wait_until(lambda: f"127.0.0.1:{third}" in answered_by(caller))
        wait_until(lambda: answered_by(caller) == {f"127.0.0.1:{second}"}, timeout=10)

        key = registry_key(NAMESPACE, "billing")
        with redis.Redis.from_url(redis_server.url) as client:
            assert client.zrange(key, 0, -1) == [url[second].encode()]
            assert 0 < client.pttl(key) <= 30_000  # as long as its last entry, no longer
        health = caller.ask(HealthCheck(target="pool"))
        assert health.details["billing"]["discovery"] == "registry"


def test_announcements_are_checked_and_the_registry_needs_redis() -> None:
    with pool(discovery="static", base_urls=["http://127.0.0.1:9"]) as system:
        with pytest.raises(InvalidMessage) as bad_url:
            system.ask(PoolAnnounce(service="billing", url="ftp://10.0.0.7"))
        assert bad_url.value.path == "url"
        with pytest.raises(InvalidMessage) as bad_name:
            system.ask(PoolAnnounce(service="bill ing!", url="http://10.0.0.7"))
        assert bad_name.value.path == "service"
        with pytest.raises(BackendUnavailable, match="registry lives in Redis"):
            system.ask(PoolAnnounce(service="billing", url="http://10.0.0.7"))
    with (  # the pool's start says why, and the supervisor gives up with it
        pytest.raises(ManagerUnavailable, match="discovery: the registry lives in Redis"),
        pool(discovery="registry"),
    ):
        pass


# -- DNS ------------------------------------------------------------------------------------


class DnsServer:
    """A DNS server on a loopback UDP port: A records of ``records``; silent when ``mute``."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.mute = False
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.socket.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.socket.recvfrom(4096)
            except OSError:
                return  # closed
            query = dns.message.from_wire(data)
            if self.mute:
                continue
            answer = dns.message.make_response(query)
            question = query.question[0]
            name = question.name.to_text().rstrip(".")
            if question.rdtype == dns.rdatatype.A and name in self.records:
                answer.answer.append(
                    dns.rrset.from_text_list(question.name, 1, "IN", "A", self.records[name])
                )
            self.socket.sendto(answer.to_wire(), peer)

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer()
    yield server
    server.close()


def test_a_name_is_resolved_again_and_each_address_is_an_instance(
    dns_server: DnsServer, instances: Instances
) -> None:
    port = instances.serve("127.0.0.1")
    instances.serve("127.0.0.2", port)  # the same service on another address
    dns_server.records["billing.test"] = ["127.0.0.1"]
    base = f"http://billing.test:{port}"
    with pool(base_urls=[base], discovery="dns", dns_server=dns_server.address) as system:
        answer = system.ask(HttpRequest(service="billing", path="/where"))
        assert answer.json() == {"at": f"127.0.0.1:{port}", "host": f"billing.test:{port}"}
        dns_server.records["billing.test"] = ["127.0.0.1", "127.0.0.2"]
        wait_until(lambda: answered_by(system) == {f"127.0.0.1:{port}", f"127.0.0.2:{port}"})
        dns_server.records["billing.test"] = ["127.0.0.2"]
        wait_until(lambda: answered_by(system) == {f"127.0.0.2:{port}"})

        dns_server.mute = True  # no answer: the instances found last stay
        health = wait_until(
            lambda: (
                (h := system.ask(HealthCheck(target="pool")))
                .details["billing"]
                .get("discovery_error")
                and h
            ),
            timeout=15,
        )
        assert "did not answer" in health.details["billing"]["discovery_error"]
        assert health.details["billing"]["status"] == "degraded"
        assert answered_by(system) == {f"127.0.0.2:{port}"}


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_an_address_found_for_a_name_is_checked_against_the_names_certificate(
    dns_server: DnsServer, instances: Instances, tmp_path: Any, transport: str
) -> None:
    ca = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("billing.test").configure_cert(tls)
    port = instances.serve("127.0.0.1", tls=tls)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    dns_server.records["billing.test"] = ["127.0.0.1"]
    with pool(
        base_urls=[f"https://billing.test:{port}"],
        discovery="dns",
        dns_server=dns_server.address,
        ca_file=str(ca_file),
        transport=transport,
    ) as system:
        answer = system.ask(HttpRequest(service="billing", path="/where"))
        assert answer.json() == {"at": f"127.0.0.1:{port}", "host": f"billing.test:{port}"}
        assert answer.url == f"https://127.0.0.1:{port}"


def test_without_a_dns_server_the_systems_resolver_finds_the_addresses(
    instances: Instances,
) -> None:
    port = instances.serve("127.0.0.1")
    served = {f"127.0.0.1:{port}"}
    with contextlib.suppress(OSError):  # where the machine has IPv6, localhost is ::1 too
        instances.serve("::1", port)
        served.add(f"::1:{port}")
    with pool(base_urls=[f"http://localhost:{port}"], discovery="dns") as system:
        health = system.ask(HealthCheck(target="pool"))
        assert f"http://127.0.0.1:{port}" in health.details["billing"]["urls"]
        assert f"127.0.0.1:{port}" in answered_by(system) <= served
