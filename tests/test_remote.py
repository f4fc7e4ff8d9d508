"""Remote requests: corral.connect() against in-process daemons on a real redis-server."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import corral
from corral._junk import REJECTED
from corral._wire import GROUP, reply_list_key, stream_key
from corral.client import Client
from corral.config import (
    BusSection,
    CodecSection,
    Config,
    DaemonSection,
    ManagerSection,
    SupervisorSection,
)
from corral.daemon import Daemon
from corral.errors import BackendUnavailable, ManagerUnavailable, NotFound, Timeout
from corral.messages.base import MAX_TIMEOUT, Count, ErrorReply, Message
from corral.messages.codec import Codec
from corral.messages.system import Ping, Pong, SupervisorChildChanged
from tests.redis_server import RedisServer
from tests.support import Done, Work, metric, next_event, scrape, wait_until


def daemon_config(url: str, **managers: ManagerSection) -> Config:
    return Config().replace(
        bus=BusSection(backend="redis", url=url, namespace="rt", reconnect_max=0.5),
        daemon=DaemonSection(port=0, heartbeat_interval=0.2, heartbeat_ttl=1.0, claim_idle=1.0),
        supervisor=SupervisorSection(backoff_initial=0.01, backoff_jitter=0.0),
        managers={
            "worker": ManagerSection(class_path="tests.support:Worker"),
            **managers,
        },
    )


@pytest.fixture
def daemon(redis_server: RedisServer) -> Iterator[Daemon]:
    with Daemon(daemon_config(redis_server.url)) as running:
        yield running


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[Client]:
    with corral.connect(redis_server.url, namespace="rt") as remote:
        yield remote


def test_remote_ask_tell_publish_subscribe(daemon: Daemon, client: Client) -> None:
    assert client.ask(Ping(payload=b"over redis")) == Pong(payload=b"over redis")
    assert client.ask(Work()).name == "worker"
    with pytest.raises(NotFound, match="nothing here") as caught:
        client.ask(Work(action="refuse"))
    assert caught.value.details == {"asked": "refuse"}
    events = client.subscribe("supervisor.child.*")
    client.tell(Work(action="crash"))
    _, event = next_event(events, SupervisorChildChanged)
    assert (event.child, event.change) == ("worker", "failed")
    assert client.ask(Work()).incarnation >= 2  # the restart is invisible remotely too


def test_remote_ask_async(daemon: Daemon, client: Client) -> None:
    async def scenario() -> list[Pong]:
        return await asyncio.gather(
            *(client.ask_async(Ping(payload=bytes([i]))) for i in range(30))
        )

    pongs = asyncio.run(scenario())
    assert [p.payload for p in pongs] == [bytes([i]) for i in range(30)]


def test_remote_system_health(daemon: Daemon, client: Client) -> None:
    health = client.health()
    assert health.status == "healthy"
    assert set(health.managers) == {"system", "worker"}


def test_no_daemon_fails_at_once(redis_server: RedisServer, client: Client) -> None:
    # Said before sending, not a Timeout after the 10 s.
    with pytest.raises(
        ManagerUnavailable, match=f"no corral daemon is serving worker at {redis_server.url}"
    ):
        client.ask(Work(), timeout=10)


def test_no_reply_in_time_is_a_timeout(daemon: Daemon, client: Client) -> None:
    with pytest.raises(Timeout, match=r"no reply to test\.work from a daemon .* within 0\.3s"):
        client.ask(Work(action="sleep", seconds=2.0), timeout=0.3)


def test_a_stopped_daemon_leaves_at_once(redis_server: RedisServer, client: Client) -> None:
    with Daemon(daemon_config(redis_server.url)):
        assert client.ask(Ping()).payload == b""
    with pytest.raises(ManagerUnavailable, match="no corral daemon is serving system"):
        client.ask(Ping())


def test_two_daemons_handle_each_request_exactly_once(
    redis_server: RedisServer, client: Client
) -> None:
    first = Daemon(daemon_config(redis_server.url))
    second = Daemon(daemon_config(redis_server.url))
    first.start()
    second.start()
    try:
        replies: list[int] = []
        lock = threading.Lock()

        def caller() -> None:
            for _ in range(50):
                reply = client.ask(Work())
                with lock:
                    replies.append(reply.handled)

        threads = [threading.Thread(target=caller) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(replies) == 200
        handled = [
            d.system.health().managers["worker"].health.metrics["handled"]  # type: ignore[union-attr]
            for d in (first, second)
        ]
        assert sum(handled) == 200  # each request ran once, on one daemon
        assert all(h > 0 for h in handled)  # and both daemons took a share
    finally:
        first.stop()
        second.stop()


def test_health_and_metrics_over_http(daemon: Daemon, client: Client) -> None:
    client.ask(Work())
    response = httpx.get(f"{daemon.url}/health?fresh=1")
    assert response.status_code == 200
    document = response.json()
    assert document["status"] == "healthy"
    assert document["managers"]["worker"]["state"] == "running"
    assert document["managers"]["worker"]["metrics"]["handled"] == 1
    assert document["bus"]["backend"] == "redis"
    assert document["remote"]["connected"] is True
    # Without ?fresh: the supervisor's latest probe, at most probe_interval old.
    wait_until(
        lambda: (
            httpx.get(f"{daemon.url}/health").json()["managers"]["worker"]["metrics"].get("handled")
            == 1
        )
    )
    work = {"manager": "worker", "type": "test.work"}
    # The request's latency is counted right after its reply is published.
    samples = wait_until(
        lambda: (
            (found := scrape(daemon.url)).get(metric("corral_request_seconds_count", **work))
            and found
        )
    )
    assert samples[metric("corral_messages_handled_total", **work)] == 1
    assert samples[metric("corral_handler_seconds_bucket", le="+Inf", **work)] == 1
    assert samples[metric("corral_request_seconds_count", **work)] == 1
    assert samples[metric("corral_manager_up", manager="system")] == 1
    assert metric("corral_bus_published_total") in samples


def test_unhealthy_daemon_answers_503(redis_server: RedisServer, client: Client) -> None:
    config = daemon_config(
        redis_server.url,
        core=ManagerSection(class_path="tests.support:Worker", critical=True, restart="temporary"),
    )
    with Daemon(config) as running:
        client.tell(Work(target="core", action="crash"))
        wait_until(lambda: httpx.get(f"{running.url}/health").status_code == 503)
        document = httpx.get(f"{running.url}/health").json()
        assert document["status"] == "unhealthy"
        assert document["managers"]["core"]["last_error"] == "RuntimeError: boom"


def test_redis_restart_under_the_daemon(fresh_redis_server: RedisServer) -> None:
    with (
        Daemon(daemon_config(fresh_redis_server.url)) as running,
        corral.connect(fresh_redis_server.url, namespace="rt") as remote,
    ):
        assert remote.ask(Ping()).payload == b""
        fresh_redis_server.stop()
        wait_until(lambda: httpx.get(f"{running.url}/health").json()["status"] == "degraded")
        with pytest.raises(BackendUnavailable):
            remote.ask(Ping())
        fresh_redis_server.start()
        wait_until(
            lambda: httpx.get(f"{running.url}/health").json()["status"] == "healthy",
            timeout=15,
        )
        wait_until(lambda: _answers(remote), timeout=10)


def _answers(remote: Client) -> bool:
    try:
        return remote.ask(Ping(payload=b"back"), timeout=2).payload == b"back"
    except (ManagerUnavailable, BackendUnavailable, Timeout):
        return False


def test_redis_password_in_the_url() -> None:
    with RedisServer("--requirepass", "s3cret") as server:
        url = server.url.replace("redis://", "redis://:s3cret@")
        with Daemon(daemon_config(url)):
            with corral.connect(url, namespace="rt") as remote:
                assert remote.ask(Ping(payload=b"auth")).payload == b"auth"
            wrong = server.url.replace("redis://", "redis://:wrong@")
            with (
                corral.connect(wrong, namespace="rt") as remote,
                pytest.raises(BackendUnavailable, match="Redis refused the credentials"),
            ):
                remote.ask(Ping())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_urls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    tls_port = _free_port()
    args = ("--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key))
    with RedisServer(*args, "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"):
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}"
        with Daemon(daemon_config(url)), corral.connect(url, namespace="rt") as remote:
            # A daemon serves once it has announced itself (a slow TLS handshake under
            # load can leave that to its first heartbeat): until then, no daemon serves.
            wait_until(lambda: _answers(remote), timeout=20)
            assert remote.ask(Ping(payload=b"tls")).payload == b"tls"


def test_acl_user_in_the_url() -> None:
    with RedisServer("--user", "alice", "on", ">wonderland", "~*", "&*", "+@all") as server:
        url = server.url.replace("redis://", "redis://alice:wonderland@")
        with Daemon(daemon_config(url)), corral.connect(url, namespace="rt") as remote:
            wait_until(lambda: _answers(remote), timeout=20)
            assert remote.ask(Ping(payload=b"acl")).payload == b"acl"


def test_a_malformed_request_entry_is_rejected_and_the_daemon_serves_on(
    redis_server: RedisServer, daemon: Daemon, client: Client
) -> None:
    raw = redis.Redis.from_url(redis_server.url)
    stream = stream_key("rt", "system")
    raw.xadd(stream, {"m": "x"})
    raw.xadd(stream, {"m": b"\x93not an envelope"})
    raw.close()
    assert daemon.remote is not None
    wait_until(lambda: daemon.remote is not None and daemon.remote.counts["rejected"] == 2)
    assert client.ask(Ping(payload=b"still here")).payload == b"still here"


def test_a_deadline_out_of_range_is_refused_with_an_answer(
    redis_server: RedisServer, daemon: Daemon, client: Client
) -> None:
    raw = redis.Redis.from_url(redis_server.url)
    stream = stream_key("rt", "system")
    replies = raw.pubsub()  # type: ignore[no-untyped-call]
    replies.ssubscribe("rt:reply.deadline-test")  # replies go by sharded pub/sub
    assert replies.get_message(timeout=5)["type"] == "ssubscribe"

    def request(deadline: int) -> bytes:
        return Codec().encode(
            Ping(payload=b"far"), reply_to="reply.deadline-test", deadline=deadline
        )

    def next_reply() -> Message:
        message = replies.get_message(timeout=5)
        assert message is not None and message["type"] == "smessage", message
        return Codec().decode(message["data"]).message

    far = int((time.time() + MAX_TIMEOUT + 3600) * 1000)
    for deadline in (2**64 - 1, 2**63, far, -5):
        raw.xadd(stream, {"m": request(deadline)})
        error = next_reply()
        assert isinstance(error, ErrorReply)
        assert error.code == "invalid_message"
        assert error.details["path"] == "d"
        assert f"got {deadline}"[:40] in error.message
    # The longest a client may wait is served.
    raw.xadd(stream, {"m": request(int((time.time() + MAX_TIMEOUT) * 1000))})
    pong = next_reply()
    assert isinstance(pong, Pong) and pong.payload == b"far"
    wait_until(lambda: raw.xlen(stream) == 0)  # every entry acknowledged and deleted
    assert raw.xpending(stream, GROUP)["pending"] == 0
    assert daemon.remote is not None and daemon.remote.counts["rejected"] == 4
    assert daemon.system.health().managers["system"].restarts == 0
    assert client.ask(Ping(payload=b"still here")).payload == b"still here"
    replies.close()
    raw.close()


@corral.message("test.counted")
class Counted(corral.Reply):
    n: Count


@corral.message("test.count_down")
class CountDown(corral.Request[Counted]):
    manager = "counter"
    n: int


class Counter(corral.Manager):
    """Answers with ``n``, which may be out of its reply's bounds."""

    name = "counter"

    @corral.handles(CountDown)
    def count(self, msg: CountDown) -> Counted:
        return Counted(n=msg.n)


def test_a_reply_out_of_its_bounds_is_an_error_not_silence(redis_server: RedisServer) -> None:
    config = daemon_config(
        redis_server.url, counter=ManagerSection(class_path="tests.test_remote:Counter")
    )
    with Daemon(config), corral.connect(redis_server.url, namespace="rt") as remote:
        assert remote.ask(CountDown(n=3)) == Counted(n=3)
        with pytest.raises(ManagerUnavailable, match=r"could not be sent: n: must be >= 0"):
            remote.ask(CountDown(n=-1), timeout=5)


def test_a_reply_too_big_to_send_is_an_error_not_silence(redis_server: RedisServer) -> None:
    config = daemon_config(redis_server.url).replace(codec=CodecSection(max_size=512))
    with Daemon(config), corral.connect(redis_server.url, namespace="rt") as remote:
        with pytest.raises(ManagerUnavailable, match="the reply could not be sent"):
            remote.health(timeout=5)  # the whole system's health is over 512 bytes
        assert remote.ask(Ping(payload=b"ok")).payload == b"ok"


def test_a_slow_request_is_not_claimed_from_a_live_daemon(redis_server: RedisServer) -> None:
    config = daemon_config(redis_server.url).replace(
        daemon=DaemonSection(port=0, heartbeat_interval=0.1, heartbeat_ttl=1.0, claim_idle=0.2)
    )
    with Daemon(config) as running:
        with corral.connect(redis_server.url, namespace="rt") as remote:
            reply = remote.ask(Work(action="sleep", seconds=1.5), timeout=10)
        assert reply.handled == 1
        health = running.system.health().managers["worker"].health
        assert health is not None
        assert health.metrics["handled"] == 1  # ran once, though idle past claim_idle
        assert running.remote is not None
        assert running.remote.counts["claimed"] == 0


def test_a_full_mailbox_does_not_hold_up_other_managers(redis_server: RedisServer) -> None:
    gate = threading.Event()
    config = daemon_config(
        redis_server.url,
        worker=ManagerSection(
            class_path="tests.support:Worker", mailbox_size=1, options={"gate": gate}
        ),
    )
    with Daemon(config) as running, corral.connect(redis_server.url, namespace="rt") as remote:
        worker = running.system.supervisor.live_ref("worker")
        assert worker is not None
        worker.tell(Work(action="block", seconds=3))  # the worker is busy ...
        for _ in range(5):
            remote.tell(Work())  # ... and these wait for room in its mailbox
        assert remote.ask(Ping(payload=b"p"), timeout=2).payload == b"p"
        gate.set()


def test_a_request_sent_twice_runs_once_and_is_answered_from_its_record(
    daemon: Daemon, client: Client, redis_server: RedisServer
) -> None:
    raw = redis.Redis.from_url(redis_server.url)
    replies = raw.pubsub()  # type: ignore[no-untyped-call]
    replies.ssubscribe("rt:reply.twice")
    deadline = int((time.time() + 10) * 1000)
    data = Codec().encode(Work(), reply_to="reply.twice", deadline=deadline)

    def next_reply() -> bytes:
        while True:
            item = replies.get_message(timeout=5)
            assert item is not None
            if item["type"] == "smessage":
                return bytes(item["data"])

    # The same request id twice, as a replay or a resubmission would send it.
    raw.xadd(stream_key("rt", "worker"), {"m": data})
    first = next_reply()
    raw.xadd(stream_key("rt", "worker"), {"m": data})
    assert next_reply() == first  # the second is answered from the record
    reply = Codec().decode(first).message
    assert isinstance(reply, Done) and reply.handled == 1
    assert client.ask(Work()).handled == 2  # the worker ran the first one only
    assert daemon.remote is not None
    assert daemon.remote.counts["answered_from_record"] == 1
    replies.close()


def test_a_request_sent_again_while_it_runs_runs_once(
    daemon: Daemon, redis_server: RedisServer
) -> None:
    raw = redis.Redis.from_url(redis_server.url)
    replies = raw.pubsub()  # type: ignore[no-untyped-call]
    replies.ssubscribe("rt:reply.again")
    deadline = int((time.time() + 10) * 1000)
    data = Codec().encode(
        Work(action="sleep", seconds=0.5), reply_to="reply.again", deadline=deadline
    )
    for _ in range(2):
        raw.xadd(stream_key("rt", "worker"), {"m": data})
    answers: list[Message] = []
    while len(answers) < 2:
        item = replies.get_message(timeout=5)
        assert item is not None, answers
        if item["type"] == "smessage":
            answers.append(Codec().decode(item["data"]).message)
    done = [a for a in answers if isinstance(a, Done)]
    assert done and all(d.handled == 1 for d in done)  # one run, whoever answers
    # The second is answered from the record if the first had finished when it came
    # up, else refused as a duplicate of a request still running.
    others = [a for a in answers if not isinstance(a, Done)]
    for other in others:
        assert isinstance(other, ErrorReply) and other.code == "conflict", other
        assert other.details["duplicate"] is True
    replies.close()


def test_requests_a_handler_takes_together_record_their_starts_together(
    daemon: Daemon, redis_server: RedisServer
) -> None:
    raw = redis.Redis.from_url(redis_server.url)
    replies = raw.pubsub()  # type: ignore[no-untyped-call]
    replies.ssubscribe("rt:reply.together")
    deadline = int((time.time() + 10) * 1000)

    def encoded(work: Work) -> bytes:
        return Codec().encode(work, reply_to="reply.together", deadline=deadline)

    # The worker sleeps on the first; the others wait behind it, the last sent twice.
    together = [encoded(Work(action="together")) for _ in range(3)]
    for data in [encoded(Work(action="sleep", seconds=1.0)), *together, together[-1]]:
        raw.xadd(stream_key("rt", "worker"), {"m": data})
    answers: list[Message] = []
    while len(answers) < 5:
        item = replies.get_message(timeout=5)
        assert item is not None, answers
        if item["type"] == "smessage":
            answers.append(Codec().decode(item["data"]).message)
    done = sorted(a.handled for a in answers if isinstance(a, Done))
    assert done == [1, 2, 3, 4]  # each ran once; the one sent twice is refused
    (refused,) = [a for a in answers if not isinstance(a, Done)]
    assert isinstance(refused, ErrorReply) and refused.code == "conflict"
    assert refused.details["duplicate"] is True
    assert daemon.remote is not None
    assert daemon.remote.counts["admitted_together"] == 3  # one round trip for three
    records: list[bytes] = [raw.get(key) for key in raw.keys("rt:{req:worker}:ran:*")]  # type: ignore[misc]
    assert len(records) == 4
    assert all(record.startswith(b"F") for record in records)  # each finished
    replies.close()


def test_an_idempotent_request_sent_twice_runs_twice(
    daemon: Daemon, redis_server: RedisServer
) -> None:
    raw = redis.Redis.from_url(redis_server.url)
    data = Codec().encode(Ping(payload=b"p"))
    for _ in range(2):
        raw.xadd(stream_key("rt", "system"), {"m": data})
    wait_until(lambda: raw.xlen(stream_key("rt", "system")) == 0)
    assert daemon.remote is not None
    assert daemon.remote.counts["answered_from_record"] == 0
    assert not raw.keys("rt:{req:system}:ran:*")  # reads leave no run record


def test_a_request_with_a_bad_field_is_answered_with_why(
    daemon: Daemon, redis_server: RedisServer
) -> None:
    with corral.connect(redis_server.url, namespace="rt", validate_messages=False) as remote:
        with pytest.raises(corral.errors.InvalidMessage) as refused:  # an answer, no Timeout
            remote.ask(Work(seconds=float("inf")), timeout=10)
        assert refused.value.path == "b.seconds"


def test_junk_in_a_reply_list_is_dropped_and_the_reply_still_taken(
    redis_server: RedisServer, daemon: Daemon, client: Client
) -> None:
    stream = stream_key("rt", "worker")
    raw = redis.Redis.from_url(redis_server.url)
    before = REJECTED.counts()
    last = raw.xinfo_stream(stream)["last-generated-id"] if raw.exists(stream) else b"0-0"
    answer: dict[str, Done] = {}
    caller = threading.Thread(
        target=lambda: answer.update(done=client.ask(Work(action="sleep", seconds=1.0)))
    )
    caller.start()
    entries: Any = []  # the request, which waits in the stream while it runs

    def added() -> bool:
        entries[:] = raw.xrange(stream, min=b"(" + last)
        return bool(entries)

    wait_until(added)
    request_id = msgpack.unpackb(entries[0][1][b"m"])["id"]
    reply_list = reply_list_key("rt", "worker", request_id)
    someone_else = Codec().encode(Done(incarnation=1, handled=999, name="x"), correlation=b"x" * 16)
    raw.lpush(reply_list, b"not an envelope", someone_else)
    caller.join(10)
    assert answer["done"].handled == 1 and answer["done"].name == "worker"
    after = REJECTED.counts()
    assert after.get(("client", "uncorrelated"), 0) == before.get(("client", "uncorrelated"), 0) + 1
    assert sum(after.values()) == sum(before.values()) + 2
    raw.close()


def test_a_connection_redis_dropped_between_asks_costs_the_next_ask_nothing(
    redis_server: RedisServer, daemon: Daemon, client: Client
) -> None:
    assert client.ask(Ping(payload=b"1")).payload == b"1"
    raw = redis.Redis.from_url(redis_server.url)
    waiting_clients = [c for c in raw.client_list() if c["cmd"] == "blpop"]
    assert waiting_clients  # the client's kept connection, which the ask above used last
    for kept in waiting_clients:
        raw.client_kill_filter(_id=kept["id"])
    assert client.ask(Ping(payload=b"2")).payload == b"2"  # at once, on a new connection
    raw.close()
