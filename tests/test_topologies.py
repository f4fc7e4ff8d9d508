"""corral on the Redis deployments people run: one URL grammar, Sentinel and Cluster.

Every server here is real: a master + replica + 3 sentinels, and a 3-master +
3-replica cluster, started by the session fixtures in conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.sentinel

import corral
from corral import _redis
from corral.config import BusSection, Config, DaemonSection, ManagerSection
from corral.daemon import Daemon
from corral.errors import ConfigError
from corral.ext.transaction import transaction
from corral.messages.auth import AuthIssue, AuthRevoke, AuthValidate
from corral.messages.cache import CacheGet, CacheSet
from corral.messages.ratelimit import RatelimitCheck
from corral.messages.state import (
    DEFAULT_PARTITIONS,
    StateChanged,
    StateCommit,
    StateGet,
    StateRegister,
    StateUpdate,
    StateWrite,
)
from corral.messages.system import Ping
from corral.streams import partition_of, partition_prefix
from corral.system import System
from tests.redis_server import ClusterGroup, RedisServer, SentinelGroup
from tests.support import corral_command, next_event, wait_until

SECRET = "a-test-signing-key-of-at-least-32-bytes"


def topology_config(url: str, namespace: str = "topo", **managers: ManagerSection) -> Config:
    """Every manager whose state lives in Redis, on ``url``; ``managers`` replace them."""
    defaults = {
        "state": ManagerSection(options={"backend": "redis"}),
        "cache": ManagerSection(options={"backends": {"shared": {"type": "redis"}}}),
        "ratelimit": ManagerSection(options={"rules": {"ip": "10/hour"}}),
        "auth": ManagerSection(options={"signing_key": SECRET, "backend": "redis"}),
    }
    return Config().replace(
        bus=BusSection(backend="redis", url=url, namespace=namespace, reconnect_max=0.5),
        daemon=DaemonSection(port=0, heartbeat_interval=0.2, heartbeat_ttl=1.0, claim_idle=1.0),
        managers={**defaults, **managers},
    )


def state_key(namespace: str, state_id: str) -> str:
    """The Redis hash of a state, with the default partitions."""
    return partition_prefix(namespace, partition_of(state_id, DEFAULT_PARTITIONS)) + "s:" + state_id


@contextmanager
def system_on(url: str, namespace: str = "topo", **managers: ManagerSection) -> Iterator[System]:
    with System(topology_config(url, namespace, **managers)) as system:
        yield system


def every_manager_works(system: Any, tag: str) -> None:
    """The main flow of state, cache, rate limiter and auth, through ``system``."""
    for n in range(30):  # keys that hash all over the slots
        system.ask(CacheSet(key=f"{tag}:k{n}", value=n))
    assert [system.ask(CacheGet(key=f"{tag}:k{n}")).value for n in range(30)] == list(range(30))
    system.ask(StateRegister(state_id=f"{tag}-order", state_type="Order", data={"n": 0}))
    updated = system.ask(StateUpdate(state_id=f"{tag}-order", data={"n": 1}))
    assert updated.version == 2
    assert system.ask(StateGet(state_id=f"{tag}-order")).data == {"n": 1}
    decisions = [system.ask(RatelimitCheck(ip=f"10.0.0.{len(tag)}")).allowed for _ in range(12)]
    assert decisions == [True] * 10 + [False] * 2
    tokens = system.ask(AuthIssue(subject="user:1"))
    assert system.ask(AuthValidate(token=tokens.access_token)).subject == "user:1"
    system.ask(AuthRevoke(token=tokens.access_token))
    with pytest.raises(corral.errors.Unauthorized):
        system.ask(AuthValidate(token=tokens.access_token))


# -- the URL grammar ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "topology", "hosts", "service", "db"),
    [
        ("redis://h:7000/2", "standalone", (("h", 7000),), None, 2),
        ("rediss://u:p@h/0", "standalone", (("h", 6379),), None, 0),
        ("unix:///run/redis.sock?db=3", "standalone", (), None, 3),
        ("redis+sentinel://a:26379,b:26380/mymaster", "sentinel",
         (("a", 26379), ("b", 26380)), "mymaster", 0),
        ("rediss+sentinel://u:p@a:1/m/4", "sentinel", (("a", 1),), "m", 4),
    ],
)  # fmt: skip
def test_the_url_grammar(
    url: str, topology: str, hosts: tuple[Any, ...], service: str | None, db: int
) -> None:
    parsed = _redis.parse_url(url)
    assert (parsed.topology, parsed.hosts, parsed.service, parsed.db) == (
        topology, hosts, service, db)  # fmt: skip
    assert "p@" not in parsed.redacted


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://h:1", "unsupported scheme 'http'"),
        ("localhost:6379", "expected a URL"),
        ("redis://h:notaport", "port 'notaport' is not a number"),
        ("redis://h:99999", "port 99999 is out of range"),
        ("redis://a:1,b:2/0", "a redis:// URL names one server"),
        ("redis+sentinel://a:26379", "a sentinel URL names the service"),
        ("redis+sentinel://a:26379/m/x", "database 'x' is not a number"),
        ("redis://h:1/zero", "database 'zero' is not a number"),
    ],
)
def test_a_bad_url_is_a_config_error_naming_the_setting(url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=rf"^bus\.url: {problem}"):
        _redis.parse_url(url, setting="bus.url")


def _config_file(tmp_path: Path, url: str) -> str:
    path = tmp_path / "corral.toml"
    path.write_text(f'[bus]\nbackend = "redis"\nurl = "{url}"\n[daemon]\nport = 0\n')
    return str(path)


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "redis://127.0.0.1:6379,x:1/0"])
def test_run_and_config_check_exit_2_on_a_bad_url(tmp_path: Path, url: str) -> None:
    config = _config_file(tmp_path, url)
    for command in (["run", "-c", config], ["config", "check", "-c", config]):
        done = subprocess.run(
            corral_command(*command), check=False, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, done.stderr
        assert "bus.url" in done.stderr


@pytest.mark.parametrize("command", [("run",), ("config", "check", "--connect")])
def test_a_replica_url_exits_2(
    tmp_path: Path, sentinel_group: SentinelGroup, command: tuple[str, ...]
) -> None:
    config = _config_file(tmp_path, sentinel_group.replica().url)
    done = subprocess.run(
        corral_command(*command, "-c", config),
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "bus.url" in done.stderr and "is a replica" in done.stderr


def test_config_check_connect_refuses_a_url_no_redis_answers(tmp_path: Path) -> None:
    with RedisServer() as server:
        url = server.url
    config = _config_file(tmp_path, url)  # that server is gone now
    done = subprocess.run(
        corral_command("config", "check", "--connect", "-c", config),
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"bus.url: no Redis answers at {url}" in done.stderr
    offline = subprocess.run(
        corral_command("config", "check", "-c", config),
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert offline.returncode == 0, offline.stderr


def test_errors_name_what_the_topology_did(redis_cluster: ClusterGroup) -> None:
    node = redis.Redis.from_url(redis_cluster.url, protocol=2)
    wrong = next(f"k{n}" for n in range(100) if _moved(node, f"k{n}"))
    with pytest.raises(redis.ResponseError) as moved:
        node.set(wrong, 1)
    assert _redis.describe(moved.value).startswith("MOVED: the key's slot lives on another")
    cluster = _redis.connect(redis_cluster.url)
    with pytest.raises(_redis.REDIS_ERRORS) as crossslot:
        cluster.execute_command("MSET", "a", 1, "b", 2)  # type: ignore[no-untyped-call]
    assert "CROSSSLOT" in _redis.describe(crossslot.value)
    node.close()
    cluster.close()


def _moved(client: redis.Redis, key: str) -> bool:
    try:
        client.get(key)
    except redis.exceptions.MovedError:
        return True
    return False


# -- Sentinel -------------------------------------------------------------------------------


def test_every_manager_on_sentinel(sentinel_group: SentinelGroup) -> None:
    with system_on(sentinel_group.url) as system:
        every_manager_works(system, "sentinel")
        assert _redis.topology(_redis.connect(sentinel_group.url)) == "sentinel"


def test_remote_requests_on_sentinel(sentinel_group: SentinelGroup) -> None:
    with (
        Daemon(topology_config(sentinel_group.url, "topo-remote")),
        corral.connect(sentinel_group.url, namespace="topo-remote") as remote,
    ):
        assert remote.ask(Ping(payload=b"s")).payload == b"s"
        every_manager_works(remote, "remote")


class Writer(threading.Thread):
    """Writes ``write(n)`` for n = 1, 2, ... until stopped; records what was acknowledged
    and the longest stretch without an acknowledgement."""

    def __init__(self, write: Any) -> None:
        super().__init__(daemon=True)
        self.write = write
        self.acknowledged: list[int] = []
        self.failures = 0
        self.stop = threading.Event()
        self.last_ok = time.monotonic()
        self.longest_outage = 0.0

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                self.write(n)
            except Exception:
                self.failures += 1
                self.stop.wait(0.01)
                continue
            now = time.monotonic()
            self.longest_outage = max(self.longest_outage, now - self.last_ok)
            self.last_ok = now
            self.acknowledged.append(n)


def test_a_sentinel_failover_is_followed(fresh_sentinel_group: SentinelGroup) -> None:
    group = fresh_sentinel_group
    old_master = group.master()
    plain = redis.sentinel.Sentinel(
        [("127.0.0.1", s.port) for s in group.sentinels], socket_timeout=0.5
    ).master_for(group.SERVICE, socket_timeout=0.5, socket_connect_timeout=0.5)  # type: ignore[no-untyped-call]
    with (
        Daemon(topology_config(group.url, "failover")) as daemon,
        corral.connect(group.url, namespace="failover") as remote,
    ):
        system = daemon.system
        system.ask(StateRegister(state_id="counter", state_type="Counter", data={"n": 0}))
        system.ask(StateRegister(state_id="remote", state_type="Counter", data={"n": 0}))
        ours = Writer(lambda n: system.ask(StateUpdate(state_id="counter", data={"n": n})))
        remotely = Writer(
            lambda n: remote.ask(StateUpdate(state_id="remote", data={"n": n}), timeout=5)
        )
        theirs = Writer(lambda n: plain.set("plain", n))
        writers = (ours, remotely, theirs)
        for writer in writers:
            writer.start()
        wait_until(lambda: all(len(w.acknowledged) > 50 for w in writers))
        old_master.kill()
        wait_until(lambda: group.master() is not old_master, timeout=30)
        before = [len(w.acknowledged) for w in writers]
        wait_until(
            lambda: all(len(w.acknowledged) > b + 50 for w, b in zip(writers, before, strict=True)),
            timeout=30,
        )
        old_master.start()  # comes back as a master until Sentinel demotes it
        after_restart = len(ours.acknowledged)
        wait_until(lambda: len(ours.acknowledged) > after_restart + 100, timeout=30)
        for writer in writers:
            writer.stop.set()
            writer.join(10)
        assert system.ask(StateGet(state_id="counter")).data == {"n": ours.acknowledged[-1]}
        assert remote.ask(StateGet(state_id="remote")).data == {"n": remotely.acknowledged[-1]}
    print(
        f"\nsentinel failover outage: System {ours.longest_outage:.2f}s, corral.connect "
        f"{remotely.longest_outage:.2f}s, plain redis-py master_for {theirs.longest_outage:.2f}s"
    )
    # Sentinel demotes the restarted ex-master; the state corral wrote is on the new one.
    wait_until(lambda: _role(old_master.port) == "slave", timeout=30)
    new_master = next(server for server in group.servers if server is not old_master)
    assert _role(new_master.port) == "master"
    with redis.Redis(port=new_master.port, protocol=2) as master:
        assert master.exists(state_key("failover", "counter"))


def test_with_wait_replicas_an_acknowledged_write_survives_a_failover(
    fresh_sentinel_group: SentinelGroup,
) -> None:
    group = fresh_sentinel_group
    old_master = group.master()
    durable = ManagerSection(options={"backend": "redis", "wait_replicas": 1, "wait_timeout": 0.5})
    with system_on(group.url, "durable", state=durable) as system:
        refused: list[str] = []

        def register(n: int) -> None:
            try:
                system.ask(StateRegister(state_id=f"w{n}", state_type="Write"))
            except corral.errors.BackendUnavailable as exc:
                refused.append(str(exc))
                raise

        writer = Writer(register)
        writer.start()
        wait_until(lambda: len(writer.acknowledged) > 50)
        old_master.kill()
        wait_until(lambda: group.master() is not old_master, timeout=30)
        # Alone, the new master has no replica to acknowledge: writes are refused...
        wait_until(lambda: any("replicas acknowledged" in r for r in refused), timeout=30)
        old_master.start()  # ...until the old master comes back as its replica.
        after = len(writer.acknowledged)
        wait_until(lambda: len(writer.acknowledged) > after + 50, timeout=60)
        writer.stop.set()
        writer.join(10)
    wait_until(lambda: _role(old_master.port) == "slave", timeout=30)
    new_master = next(server for server in group.servers if server is not old_master)
    assert _role(new_master.port) == "master"
    with redis.Redis(port=new_master.port, protocol=2) as master:
        keys = [state_key("durable", f"w{n}") for n in writer.acknowledged]
        present = sum(master.exists(*keys[i : i + 500]) for i in range(0, len(keys), 500))
    assert present == len(writer.acknowledged)  # not one acknowledged write was lost
    assert "it may not survive a failover" in refused[-1]


def test_wait_replicas_refuses_when_no_replica_acknowledges(redis_server: RedisServer) -> None:
    durable = ManagerSection(options={"backend": "redis", "wait_replicas": 1, "wait_timeout": 0.1})
    with system_on(redis_server.url, "alone", state=durable) as system:
        with pytest.raises(corral.errors.BackendUnavailable, match="only 0 of 1 replicas"):
            system.ask(StateRegister(state_id="s", state_type="T"))
        assert system.ask(StateGet(state_id="s")).version == 1  # applied, as it says


def _role(port: int) -> str:
    with redis.Redis(port=port, protocol=2) as client:
        role = client.execute_command("ROLE")[0]
    return role.decode() if isinstance(role, bytes) else str(role)


# -- Cluster --------------------------------------------------------------------------------


@pytest.mark.parametrize("node", [0, 4])
def test_every_manager_on_a_cluster_from_any_node(redis_cluster: ClusterGroup, node: int) -> None:
    url = redis_cluster.node_url(node)
    assert _redis.topology(_redis.connect(url)) == "cluster"
    with system_on(url, f"topo{node}") as system:
        every_manager_works(system, f"cluster{node}")


def test_remote_requests_on_a_cluster(redis_cluster: ClusterGroup) -> None:
    with (
        Daemon(topology_config(redis_cluster.url, "topo-remote")),
        corral.connect(redis_cluster.node_url(2), namespace="topo-remote") as remote,
    ):
        assert remote.ask(Ping(payload=b"c")).payload == b"c"
        every_manager_works(remote, "remote")


def test_on_a_cluster_corrals_own_channels_are_sharded(redis_cluster: ClusterGroup) -> None:
    # Sharded pub/sub keeps a message on its shard and out of every PSUBSCRIBE: replies
    # and cache invalidations must not be seen by a pattern subscriber on any master.
    listeners = []
    for master in redis_cluster.masters():
        pubsub = redis.Redis(port=master.port, protocol=2).pubsub()  # type: ignore[no-untyped-call]
        pubsub.psubscribe("shard:*")
        listeners.append(pubsub)
    tiered = ManagerSection(options={"backends": {"shared": {"type": "tiered"}}})
    with (
        Daemon(topology_config(redis_cluster.url, "shard", cache=tiered)),
        corral.connect(redis_cluster.url, namespace="shard") as remote,
    ):
        assert remote.ask(Ping(payload=b"p")).payload == b"p"
        remote.ask(CacheSet(key="k", value=1))
        seen = []
        for pubsub in listeners:
            while (message := pubsub.get_message(timeout=0.2)) is not None:
                if message["type"] == "pmessage":
                    seen.append(message["channel"])
            pubsub.close()
    assert any(b"supervisor.child.started" in c for c in seen)  # events stay classic
    assert not [c for c in seen if b"reply." in c or b":invalidated" in c], seen


def test_two_systems_on_one_cluster_never_exceed_a_limit(redis_cluster: ClusterGroup) -> None:
    with system_on(redis_cluster.node_url(1)) as one, system_on(redis_cluster.node_url(3)) as two:
        allowed = sum(
            system.ask(RatelimitCheck(ip="9.9.9.9")).allowed
            for _ in range(15)
            for system in (one, two)
        )
    assert allowed == 10


def test_a_cluster_failover_is_followed(fresh_redis_cluster: ClusterGroup) -> None:
    cluster = fresh_redis_cluster
    plain = redis.cluster.RedisCluster.from_url(cluster.url, socket_timeout=0.5)
    with system_on(cluster.url, "cfail") as system:
        system.ask(StateRegister(state_id="counter", state_type="Counter", data={"n": 0}))
        ours = Writer(lambda n: system.ask(StateUpdate(state_id="counter", data={"n": n})))
        counter = state_key("cfail", "counter")
        theirs = Writer(lambda n: plain.set(counter + ":plain", n))  # the same slot
        ours.start()
        theirs.start()
        wait_until(lambda: len(ours.acknowledged) > 50 and len(theirs.acknowledged) > 50)
        owner = plain.get_node_from_key(counter)  # type: ignore[no-untyped-call]
        victim = next(s for s in cluster.servers if s.port == owner.port)
        victim.kill()
        before = len(ours.acknowledged), len(theirs.acknowledged)
        wait_until(lambda: len(ours.acknowledged) > before[0] + 50, timeout=40)
        wait_until(lambda: len(theirs.acknowledged) > before[1] + 50, timeout=40)
        ours.stop.set()
        theirs.stop.set()
        ours.join(10)
        theirs.join(10)
        assert system.ask(StateGet(state_id="counter")).data == {"n": ours.acknowledged[-1]}
    plain.close()
    print(
        f"\ncluster failover outage: corral {ours.longest_outage:.2f}s, "
        f"plain RedisCluster {theirs.longest_outage:.2f}s"
    )


# -- state partitions -----------------------------------------------------------------------


def test_10000_states_spread_over_the_masters(redis_cluster: ClusterGroup) -> None:
    with system_on(redis_cluster.url, "spread") as system:

        def write(start: int) -> None:
            for n in range(start, 10_000, 4):
                system.ask(StateRegister(state_id=f"s{n}", state_type="T"))

        threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    counts = []
    for master in redis_cluster.masters():
        with redis.Redis(port=master.port, protocol=2) as client:
            counts.append(sum(1 for _ in client.scan_iter(match="spread:*:s:*", count=1000)))
    assert sum(counts) == 10_000
    assert max(counts) <= 5_000, counts


def test_a_commit_spans_one_partition_and_hash_tags_share_one(redis_cluster: ClusterGroup) -> None:
    with system_on(redis_cluster.url, "tags") as system:
        together = [
            StateWrite(state_id=f"order:{{42}}:{part}", transition="create", state_type="Order")
            for part in ("items", "total", "shipping")
        ]
        committed = system.ask(StateCommit(writes=together))
        assert [state.version for state in committed.states] == [1, 1, 1]
        first, second = "alpha", next(
            f"omega{n}" for n in range(100) if partition_of(f"omega{n}", 16) != partition_of(
                "alpha", 16)
        )  # fmt: skip
        apart = [
            StateWrite(state_id=state_id, transition="create", state_type="T")
            for state_id in (first, second)
        ]
        with pytest.raises(corral.errors.InvalidMessage) as refused:
            system.ask(StateCommit(writes=apart))
        message = str(refused.value)
        assert f"'{first}' (partition " in message and f"'{second}' (partition " in message
        assert "same hash tag" in message
        with pytest.raises(corral.errors.NotFound):
            system.ask(StateGet(state_id="alpha"))  # nothing of it applied


def test_transactions_on_a_cluster_with_hash_tags(redis_cluster: ClusterGroup) -> None:
    tx_manager = ManagerSection(depends_on=["state"])
    with system_on(redis_cluster.node_url(3), "tx", transaction=tx_manager) as system:
        system.ask(StateRegister(state_id="cart:{7}:items", state_type="Cart", data={"n": 0}))
        with transaction(system) as tx:
            tx.update("cart:{7}:items", data={"n": 1})
            tx.register("cart:{7}:total", "Cart", data={"sum": 10})
            mark = tx.savepoint()
            tx.update("cart:{7}:total", data={"sum": 99})
            tx.rollback_to_savepoint(mark)
        assert system.ask(StateGet(state_id="cart:{7}:items")).data == {"n": 1}
        assert system.ask(StateGet(state_id="cart:{7}:total")).data == {"sum": 10}
        with pytest.raises(RuntimeError, match="rolled back"):
            _update_then_fail(system, "cart:{7}:items")
        assert system.ask(StateGet(state_id="cart:{7}:items")).data == {"n": 1}


def _update_then_fail(system: System, state_id: str) -> None:
    with transaction(system) as tx:
        tx.update(state_id, data={"n": 2})
        raise RuntimeError("rolled back")


def test_a_durable_subscription_follows_every_partition_and_resumes_from_its_position(
    redis_cluster: ClusterGroup,
) -> None:
    with system_on(redis_cluster.url, "follow") as system:
        for n in range(40):
            system.ask(StateRegister(state_id=f"u{n}", state_type="User"))
        with system.subscribe("state.changed.*", from_offset=0) as sub:
            seen = {next_event(sub, StateChanged)[1].state_id for _ in range(40)}
            position = sub.position  # type: ignore[attr-defined]
        assert seen == {f"u{n}" for n in range(40)}
        assert len(position.split(",")) == 16
        for n in range(40, 50):
            system.ask(StateRegister(state_id=f"u{n}", state_type="User"))
        with system.subscribe("state.changed.*", from_offset=position) as sub:
            later = {next_event(sub, StateChanged)[1].state_id for _ in range(10)}
            assert sub.get(timeout=0.3) is None  # nothing seen before comes again
        assert later == {f"u{n}" for n in range(40, 50)}
        with pytest.raises(ValueError, match="several streams"):
            system.subscribe("state.changed.*", from_offset=12)


def test_two_systems_must_agree_on_the_partitions(redis_server: RedisServer) -> None:
    with system_on(redis_server.url, "agree") as first:
        first.ask(StateRegister(state_id="a", state_type="T"))
        other = ManagerSection(options={"backend": "redis", "partitions": 4})
        with (
            pytest.raises(corral.errors.ManagerUnavailable, match="in 16 partitions already"),
            system_on(redis_server.url, "agree", state=other),
        ):
            pass


def test_the_test_cluster_is_what_it_says(redis_cluster: ClusterGroup) -> None:
    assert len(redis_cluster.masters()) == 3
    assert all(isinstance(server, RedisServer) for server in redis_cluster.servers)
    assert os.path.exists(redis_cluster.servers[0].dir / "nodes.conf")
