"""The one place corral builds Redis clients: URLs, topologies, errors.

Every setting that names Redis takes one of these URLs::

    redis://[user:pass@]host:port[/db]          a standalone server, or any node of a
    rediss://...                                Cluster (found by asking the node; TLS)
    unix:///run/redis.sock[?db=0]               a standalone server on a Unix socket
    redis+sentinel://[user:pass@]host:port[,host:port...]/service[/db]
    rediss+sentinel://...                       the master of ``service``, found through
                                                the sentinels and followed across failovers

Query parameters ``sentinel_username`` and ``sentinel_password`` authenticate to the
sentinels when they need it (the user and password in the URL are the master's).

::

    client = connect("redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster/0")
    client.set("k", "v")                 # redis.Redis, redis.cluster.RedisCluster...
    topology(client)                     # "standalone" | "sentinel" | "cluster"

A node that reports ``cluster_enabled:1`` gets a cluster client, so any node's URL
works (as ``redis-cli -c`` does); the node is asked each time a client is built.
:func:`describe` turns a Redis error into words that name the topology (``MOVED``,
``READONLY``, ``CLUSTERDOWN``, ``CROSSSLOT``, no master for a service) instead of
"unavailable".
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import urllib.parse
from collections.abc import Sequence
from typing import Any, Literal, cast

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from corral.errors import ConfigError

__all__ = [
    "REDIS_ERRORS",
    "AsyncRedis",
    "KeptConnections",
    "RedisURL",
    "SyncRedis",
    "Topology",
    "check_writable",
    "connect",
    "connect_async",
    "describe",
    "disconnect",
    "execute_then_publish",
    "glob_escape",
    "master_urls",
    "masters",
    "node_of",
    "parse_url",
    "publish_own",
    "redact",
    "subscriber",
    "subscriber_async",
    "time_ms",
    "topology",
]

Topology = Literal["standalone", "sentinel", "cluster"]
SyncRedis = redis.Redis | redis.cluster.RedisCluster
AsyncRedis = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster

#: What a Redis call can raise when Redis, or the way to it, fails.
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException, OSError)

_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")
_CONNECT_TIMEOUT = 2.0
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")


@dataclasses.dataclass(frozen=True)
class RedisURL:
    """A parsed Redis URL; ``url`` is what was given."""

    url: str
    topology: Literal["standalone", "sentinel"]
    tls: bool
    hosts: tuple[tuple[str, int], ...]  # the server, or the sentinels
    service: str | None
    db: int
    username: str | None
    password: str | None
    options: dict[str, str]

    @property
    def redacted(self) -> str:
        return redact(self.url)


def redact(url: str) -> str:
    """The URL without its credentials and query, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def parse_url(url: str, *, setting: str = "redis url") -> RedisURL:
    """Check ``url`` against the grammar above; ConfigError naming ``setting`` if it is off."""

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{setting}: {why} (got {redact(url)!r})", {"setting": setting})

    if not isinstance(url, str) or "://" not in url:
        raise bad("expected a URL such as redis://host:6379/0 or redis+sentinel://host:26379/name")
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise bad(f"unsupported scheme {scheme!r}: use one of {', '.join(_SCHEMES)}")
    options = dict(urllib.parse.parse_qsl(parts.query))
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    if scheme == "unix":
        if not parts.path:
            raise bad("a unix:// URL needs the socket's path")
        return RedisURL(url, "standalone", False, (), None, _db(options.get("db", "0"), bad),
                        username, password, options)  # fmt: skip
    hosts = _hosts(parts.netloc.rpartition("@")[2], bad)
    if scheme.endswith("+sentinel"):
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise bad("a sentinel URL names the service: redis+sentinel://host:26379/mymaster")
        if len(path) > 2:
            raise bad("expected /service or /service/db after the sentinels")
        db = _db(path[1], bad) if len(path) == 2 else 0
        return RedisURL(url, "sentinel", scheme.startswith("rediss"), hosts, path[0], db,
                        username, password, options)  # fmt: skip
    if len(hosts) != 1:
        raise bad("a redis:// URL names one server (list sentinels with redis+sentinel://)")
    db_path = parts.path.strip("/")
    db = _db(db_path, bad) if db_path else _db(options.get("db", "0"), bad)
    return RedisURL(url, "standalone", scheme == "rediss", hosts, None, db, username, password,
                    options)  # fmt: skip


def _hosts(netloc: str, bad: Any) -> tuple[tuple[str, int], ...]:
    if not netloc:
        raise bad("no host")
    hosts = []
    for item in netloc.split(","):
        host, sep, port = item.rpartition(":") if not item.endswith("]") else (item, "", "")
        if not sep:
            host, port = item, "6379"
        host = host.strip("[]")
        if not host:
            raise bad(f"no host in {item!r}")
        try:
            number = int(port)
        except ValueError:
            raise bad(f"port {port!r} is not a number") from None
        if not 0 < number < 65536:
            raise bad(f"port {number} is out of range")
        hosts.append((host, number))
    return tuple(hosts)


def _db(text: str, bad: Any) -> int:
    if not text.isdigit():
        raise bad(f"database {text!r} is not a number")
    return int(text)


# -- building clients -----------------------------------------------------------------------


def _client_options(
    socket_timeout: float | None,
    connect_timeout: float,
    retries: int,
    health_check_interval: float,
    retry_on_no_error: bool,
) -> dict[str, Any]:
    retry = (
        Retry(NoBackoff(), 0, supported_errors=()) if retry_on_no_error else
        Retry(NoBackoff(), retries)
    )  # fmt: skip
    return {
        "protocol": 2,
        "retry": retry,
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": socket_timeout,
        "health_check_interval": health_check_interval,
    }


def _is_cluster(url: str, target: RedisURL) -> bool:
    """Whether the node at ``url`` runs in cluster mode. Asked each time a client is
    built (at start and on reconnects, never per command): the server behind an address
    may change. A node that does not answer counts as standalone."""
    if target.topology != "standalone" or not target.hosts:
        return False
    try:
        with redis.Redis.from_url(url, protocol=2, socket_connect_timeout=_CONNECT_TIMEOUT,
                                  socket_timeout=_CONNECT_TIMEOUT) as probe:  # fmt: skip
            info = cast("dict[str, Any]", probe.info("cluster"))
    except REDIS_ERRORS:
        return False
    return bool(info.get("cluster_enabled"))


def _sentinel_kwargs(target: RedisURL, options: dict[str, Any]) -> dict[str, Any]:
    kwargs = {
        "socket_connect_timeout": options["socket_connect_timeout"],
        "socket_timeout": options["socket_connect_timeout"],
        "protocol": 2,
    }
    for name in _SENTINEL_OPTIONS:
        if name in target.options:
            kwargs[name.removeprefix("sentinel_")] = target.options[name]
    if target.tls:
        kwargs["ssl"] = True
    return kwargs


def connect(
    url: str,
    *,
    setting: str = "redis url",
    socket_timeout: float | None = 5.0,
    connect_timeout: float = _CONNECT_TIMEOUT,
    retries: int = 1,
    health_check_interval: float = 0,
    retry_on_no_error: bool = False,
    node: bool = False,
    **extra: Any,
) -> SyncRedis:
    """A client for ``url``: standalone, Sentinel-managed or cluster.

    ``retries`` is how many times a command is sent again on a fresh connection after
    a connection error (0 for commands that must not run twice); ``retry_on_no_error``
    turns redis-py's own reconnect-and-resubscribe off for a pub/sub reader that owns
    its reconnection. ``extra`` goes to redis-py as it is (``decode_responses``,
    ``max_connections``...). ``node``: a client of that one node, even in a cluster.
    """
    options = _client_options(
        socket_timeout, connect_timeout, retries, health_check_interval, retry_on_no_error
    )
    return cast("SyncRedis", _build(url, setting, node, options, extra, _SYNC))


def _master_for(target: RedisURL, sentinel_class: Any, options: dict[str, Any]) -> Any:
    sentinel = sentinel_class(
        list(target.hosts), sentinel_kwargs=_sentinel_kwargs(target, options), **options
    )
    master_options: dict[str, Any] = {"db": target.db}
    if target.username:
        master_options["username"] = target.username
    if target.password is not None:
        master_options["password"] = target.password
    if target.tls:
        master_options["ssl"] = True
    return sentinel.master_for(target.service, **master_options)


def connect_async(
    url: str,
    *,
    setting: str = "redis url",
    socket_timeout: float | None = 5.0,
    connect_timeout: float = _CONNECT_TIMEOUT,
    retries: int = 1,
    health_check_interval: float = 0,
    node: bool = False,
    **extra: Any,
) -> AsyncRedis:
    """The asyncio twin of :func:`connect` (the cluster check runs synchronously, once)."""
    options = _client_options(socket_timeout, connect_timeout, retries, health_check_interval,
                              False)  # fmt: skip
    options["retry"] = redis.asyncio.retry.Retry(NoBackoff(), retries)
    return cast("AsyncRedis", _build(url, setting, node, options, extra, _ASYNC))


def _build(
    url: str,
    setting: str,
    node: bool,
    options: dict[str, Any],
    extra: dict[str, Any],
    classes: tuple[Any, Any, Any],
) -> Any:
    """A client of ``classes`` (Sentinel, cluster, plain) for ``url``."""
    sentinel_class, cluster_class, plain_class = classes
    target = parse_url(url, setting=setting)
    options.update(extra)
    if target.topology == "sentinel":
        return _master_for(target, sentinel_class, options)
    if not node and _is_cluster(url, target):
        options.pop("health_check_interval")
        options.pop("retry")  # a cluster client retries by its own policy
        return cluster_class.from_url(url, **options)
    return plain_class.from_url(url, **options)


_SYNC = (redis.sentinel.Sentinel, redis.cluster.RedisCluster, redis.Redis)
_ASYNC = (redis.asyncio.sentinel.Sentinel, redis.asyncio.cluster.RedisCluster, redis.asyncio.Redis)


def subscriber(url: str, **kwargs: Any) -> redis.Redis:
    """A client whose ``pubsub()`` receives every classic PUBLISH of the deployment.

    On a cluster any node does (classic pub/sub is broadcast): a master is picked at
    random, so a call after a failover finds a live one; with ``shard_channel``, the
    master that owns that channel's slot, so that the connection may SSUBSCRIBE it too.
    Takes :func:`connect`'s options.
    """
    target, node = _subscriber_target(url, kwargs)
    return cast("redis.Redis", connect(target, node=node, **kwargs))


def _subscriber_target(url: str, kwargs: dict[str, Any]) -> tuple[str, bool]:
    """The URL a subscriber connects to, and whether it names one node of a cluster;
    takes ``shard_channel`` out of ``kwargs``."""
    shard_channel = kwargs.pop("shard_channel", None)
    target = parse_url(url, setting=kwargs.get("setting", "redis url"))
    if target.topology == "standalone" and _is_cluster(url, target):
        return _node_url(url, shard_channel, kwargs), True
    return url, False


def _node_url(url: str, shard_channel: str | None, kwargs: dict[str, Any]) -> str:
    """The URL of a master of the cluster ``url`` names: the one that owns the slot of
    ``shard_channel`` when that is given (where SSUBSCRIBE must go), else one at random."""
    options = {k: v for k, v in kwargs.items() if k in ("setting", "connect_timeout")}
    cluster = cast("redis.cluster.RedisCluster", connect(url, **options))
    try:
        if shard_channel is not None:
            node = cluster.get_node_from_key(shard_channel)  # type: ignore[no-untyped-call]
        else:
            node = random.choice(cluster.get_primaries())  # type: ignore[no-untyped-call]
    finally:
        cluster.close()
    return _at_node(url, node.host, node.port)


def _at_node(url: str, host: str, port: int) -> str:
    """``url`` (its credentials and options) pointed at one node."""
    parts = urllib.parse.urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@" if credentials else ""
    return urllib.parse.urlunsplit((parts.scheme, f"{netloc}{host}:{port}", "", parts.query, ""))


def master_urls(url: str, *, setting: str = "redis url") -> list[str]:
    """``url`` itself, or on a cluster the URL of each of its masters now (for what must
    talk to every node on its own connection, such as client-side caching's tracking)."""
    target = parse_url(url, setting=setting)
    if target.topology != "standalone" or not _is_cluster(url, target):
        return [url]
    cluster = cast("redis.cluster.RedisCluster", connect(url, setting=setting))
    try:
        primaries = cluster.get_primaries()  # type: ignore[no-untyped-call]
    finally:
        cluster.close()
    return [_at_node(url, node.host, node.port) for node in primaries]


ASYNC_SHARDED_PUBSUB = hasattr(redis.asyncio.client.PubSub, "ssubscribe")
"""Whether redis-py's asyncio client speaks sharded pub/sub (SSUBSCRIBE): from 8.0 on."""


def subscriber_async(url: str, **kwargs: Any) -> AsyncRedis:
    """The asyncio twin of :func:`subscriber`."""
    target, node = _subscriber_target(url, kwargs)
    return connect_async(target, node=node, **kwargs)


def disconnect(client: SyncRedis) -> None:
    """Drop every connection of ``client``: wakes a thread blocked in a read on one."""
    if isinstance(client, redis.cluster.RedisCluster):
        for node in client.get_nodes():  # type: ignore[no-untyped-call]
            if node.redis_connection is not None:
                node.redis_connection.connection_pool.disconnect()
    else:
        client.connection_pool.disconnect()


def masters(client: SyncRedis) -> list[redis.Redis]:
    """A client per master: ``client`` itself, or one per master node of a cluster (for
    what runs node by node, such as SCAN)."""
    if isinstance(client, redis.cluster.RedisCluster):
        return [
            client.get_redis_connection(node)
            for node in client.get_primaries()  # type: ignore[no-untyped-call]
        ]
    return [client]


_GLOB_SPECIALS = frozenset("*?[]\\")


def glob_escape(text: str) -> str:
    r"""``text`` as a literal inside a Redis glob pattern (SCAN MATCH, PSUBSCRIBE)::

    print(glob_escape("user:[1]*"))      # user:\[1\]\*
    """
    return "".join("\\" + c if c in _GLOB_SPECIALS else c for c in text)


def publish_own(client: SyncRedis, channel: str, data: bytes) -> int:
    """Publish on one of corral's own exact channels (replies, cache invalidations,
    orders between daemons) by sharded pub/sub, SPUBLISH: never seen by a pattern
    subscriber, and on a cluster kept on the channel's shard, where its subscribers
    SSUBSCRIBE (see :func:`subscriber`). Returns how many received it."""
    return int(client.spublish(channel, data))


def node_of(client: SyncRedis, key: str) -> redis.Redis:
    """The client of the node holding ``key``: ``client`` itself but on a cluster."""
    if not isinstance(client, redis.cluster.RedisCluster):
        return client
    node = client.get_node_from_key(key)  # type: ignore[no-untyped-call]
    return client.get_redis_connection(node)


class KeptConnections:
    """Connections for hot paths, kept by node and socket timeout, sending pipelines of
    raw commands (:meth:`call`).

    Taking one does not check it as redis-py's pool does (a select and two changes of
    the socket's timeout, each giving the GIL up: with a few busy threads, as much CPU
    as the rest of a call); one that Redis closed meanwhile fails instead, and the call
    is sent again once on a new one::

        kept = KeptConnections()
        kept.call(node_of(client, "k"), [("SET", "k", "v"), ("GET", "k")], 5.0)
    """

    def __init__(self) -> None:
        self._idle: dict[tuple[redis.Redis, float], list[Any]] = {}

    def call(
        self, node: redis.Redis, commands: Sequence[tuple[Any, ...]], socket_timeout: float
    ) -> list[object]:
        """The answers to ``commands``, sent together on a connection to ``node`` whose
        reads may block ``socket_timeout`` seconds. An error answer ends the call: it is
        returned last, and the connection closed (a later command, a ``BLPOP``, could
        wait for nothing)."""
        conn, kept = self._take(node, socket_timeout, new=False)
        while True:
            answers: list[object] = []
            try:
                conn.send_packed_command(conn.pack_commands(commands))
                for _ in commands:
                    answers.append(conn.read_response())
            except redis.ResponseError as exc:
                conn.disconnect()
                return [*answers, exc]
            except redis.ConnectionError:
                conn.disconnect()
                if kept and not answers:  # closed while kept: Redis took nothing from it
                    conn, kept = self._take(node, socket_timeout, new=True)
                    continue
                raise
            except BaseException:
                conn.disconnect()
                raise
            self._idle[node, socket_timeout].append(conn)
            return answers

    def _take(self, node: redis.Redis, socket_timeout: float, *, new: bool) -> tuple[Any, bool]:
        """A connection to ``node``, and whether it was kept (else it is ``new``)."""
        idle = self._idle.setdefault((node, socket_timeout), [])
        if not new:
            with contextlib.suppress(IndexError):
                return idle.pop(), True
        pool = node.connection_pool  # its settings, not its count of connections
        conn: Any = pool.connection_class(**pool.connection_kwargs)
        conn.socket_timeout = socket_timeout
        conn.connect()  # its own way: a Sentinel's connection asks where the master is
        return conn, False

    def close(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop().disconnect()


def execute_then_publish(
    client: SyncRedis, pipe: Any, messages: Sequence[tuple[str, bytes]]
) -> list[Any]:
    """Run the non-transactional ``pipe`` and publish ``messages`` (channel, data) after
    its commands, in the same round trip but on a cluster, whose pipelines cannot carry a
    PUBLISH. The messages go by :func:`publish_own`. Returns the replies of the pipe's
    own commands."""
    if isinstance(client, redis.cluster.RedisCluster):
        replies: list[Any] = pipe.execute()
        for channel, data in messages:
            publish_own(client, channel, data)
        return replies
    queued = len(pipe)
    for channel, data in messages:
        pipe.spublish(channel, data)
    replies = pipe.execute()
    return replies[:queued]


def topology(client: Any) -> Topology:
    """What kind of deployment ``client`` (sync or asyncio) talks to."""
    if isinstance(client, redis.cluster.RedisCluster | redis.asyncio.cluster.RedisCluster):
        return "cluster"
    pool = getattr(client, "connection_pool", None)
    if isinstance(
        pool, redis.sentinel.SentinelConnectionPool | redis.asyncio.sentinel.SentinelConnectionPool
    ):
        return "sentinel"
    return "standalone"


def check_writable(url: str, *, setting: str = "redis url") -> Topology | None:
    """Connect once and make sure ``url`` does not lead to a replica.

    A replica's URL is a ConfigError naming ``setting``. Returns the topology found,
    or None when nothing answers (an outage at start-up is waited out, not refused).
    """
    target = parse_url(url, setting=setting)
    client = connect(url, setting=setting, retries=0)
    try:
        found = topology(client)
        if found == "cluster":
            return found  # any node's URL serves: the client finds the masters
        role = cast("list[Any]", client.execute_command("ROLE"))  # type: ignore[no-untyped-call]
    except REDIS_ERRORS:
        return None
    finally:
        client.close()
    kind = role[0].decode() if isinstance(role[0], bytes) else str(role[0])
    if kind != "master":
        raise ConfigError(
            f"{setting}: {target.redacted} is a {'replica' if kind == 'slave' else kind}, "
            "not a master: corral writes, so name the master (or the sentinels with "
            "redis+sentinel://, or any node of a cluster)",
            {"setting": setting, "role": kind},
        )
    return found


def time_ms(reply: tuple[int, int]) -> int:
    """A ``TIME`` reply (seconds, microseconds) as unix milliseconds: Redis's clock, the one
    every daemon's heartbeat is measured by::

        now = time_ms(client.time())          # or time_ms(await client.time())
    """
    seconds, microseconds = reply
    return int(seconds) * 1000 + int(microseconds) // 1000


def describe(exc: BaseException, where: str = "") -> str:
    """``exc`` in words that name what the topology did."""
    text = str(exc)
    head = text.split(" ", 1)[0].upper()
    at = f" ({where})" if where else ""
    if isinstance(exc, redis.sentinel.MasterNotFoundError):
        return f"no master for the Sentinel service{at}: {text}"
    if isinstance(exc, redis.exceptions.ReadOnlyError) or head == "READONLY":
        return f"READONLY: the node is a replica now, a failover is under way{at}"
    if isinstance(exc, redis.exceptions.AskError) or head in ("MOVED", "ASK"):
        kind = "MOVED" if isinstance(exc, redis.exceptions.MovedError) or head == "MOVED" else "ASK"
        return f"{kind}: the key's slot lives on another cluster node{at}: {text}"
    if head == "CLUSTERDOWN" or isinstance(exc, redis.exceptions.ClusterDownError):
        return f"CLUSTERDOWN: the cluster cannot serve this slot now{at}: {text}"
    if head == "CROSSSLOT" or "CROSSSLOT" in text or "map to the same key slot" in text:
        return f"CROSSSLOT: one command touched keys of several cluster slots{at}"
    if isinstance(exc, redis.AuthenticationError | redis.exceptions.AuthorizationError):
        return f"Redis refused the credentials{at}: {text}"
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError | OSError):
        return f"Redis unreachable{at}: {text or type(exc).__name__}"
    return f"{type(exc).__name__}{at}: {text}"
