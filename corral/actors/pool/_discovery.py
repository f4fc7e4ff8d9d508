"""Where a service's instances are, found again every ``discovery_interval`` seconds.

- ``dns``: the host name of each base URL, resolved (A and AAAA records) by the system's
  resolver, or by ``dns_server`` when set (Consul's DNS interface, a cluster's DNS). Each
  address is an instance, reached at that address with the name in its ``Host`` header
  and as its TLS server name::

      await resolve(["https://billing.service.consul:8443"], dns_server="127.0.0.1:8600")
      # [Instance(url="https://10.0.0.7:8443", host="billing.service.consul:8443",
      #           server_name="billing.service.consul"), ...]

- ``registry``: the base URLs instances announced in Redis with a time to live
  (``PoolAnnounce``), kept as a sorted set per service, URL -> expiry in unix ms on
  Redis's clock, at :func:`registry_key`; an instance that stops announcing itself drops
  out when its entry expires. Anything that can write to Redis may announce::

      ZADD corral:{pool:billing}:instances <Redis TIME in ms + ttl> http://10.0.0.7:8000
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import cast

import httpx

from corral._redis import AsyncRedis

__all__ = [
    "ANNOUNCE",
    "WITHDRAW",
    "Instance",
    "nameserver",
    "registered",
    "registry_key",
    "resolve",
]

DNS_TIMEOUT = 2.0
"""Seconds one resolution of a name may take, all its nameserver tries included."""


@dataclass(frozen=True, slots=True, order=True)
class Instance:
    """One instance of a service: where to connect, and the name it answers to."""

    url: str
    host: str = ""
    """The ``Host`` header (name and port) when ``url`` holds an address found for it."""
    server_name: str = ""
    """The TLS server name (SNI, certificate check) when ``url`` holds an address."""


def registry_key(namespace: str, service: str) -> str:
    """The sorted set of ``service``'s announced base URLs (one hash slot per service)."""
    return f"{namespace}:{{pool:{service}}}:instances"


_NOW_MS = """
local now = redis.call('TIME')
now = now[1] * 1000 + math.floor(now[2] / 1000)
"""

ANNOUNCE = (
    _NOW_MS
    + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] then redis.call('PEXPIREAT', KEYS[1], last[2]) end
return redis.call('ZCARD', KEYS[1])
"""
)
"""KEYS[1] the registry, ARGV url, ttl in ms: announce on Redis's clock (no skew between
hosts), drop what expired, keep the key as long as its last entry; the count left."""

WITHDRAW = (
    _NOW_MS
    + """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""
)

_LIVE = (
    _NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""
)
"""KEYS[1] the registry: what has not expired (dropping what has)."""


async def registered(client: AsyncRedis, key: str) -> list[Instance]:
    """The base URLs announced at ``key`` whose time (on Redis's clock) has not run out;
    those that have are dropped."""
    urls = cast("list[bytes | str]", await client.eval(_LIVE, 1, key))
    return sorted(Instance(url.decode() if isinstance(url, bytes) else url) for url in urls)


async def resolve(base_urls: list[str], dns_server: str = "") -> list[Instance]:
    """An instance per address of each base URL's host (an address host is itself)."""
    found: list[Instance] = []
    for base in base_urls:
        url = httpx.URL(base)
        if _is_address(url.host):
            found.append(Instance(base))
            continue
        port = url.port or (443 if url.scheme == "https" else 80)
        if dns_server:
            addresses = await _ask(dns_server, url.host)
        else:
            addresses = await _system_resolver(url.host, port)
        netloc = url.host if url.port is None else f"{url.host}:{url.port}"
        for address in sorted(set(addresses)):
            host = f"[{address}]" if ":" in address else address
            found.append(
                Instance(
                    str(url.copy_with(host=host, port=port)).rstrip("/"),
                    host=netloc,
                    server_name=url.host if url.scheme == "https" else "",
                )
            )
    return found


def nameserver(server: str) -> tuple[str, int]:
    """``dns_server`` (``10.0.0.2``, ``10.0.0.2:8600``, ``[fd00::2]:53``) as address and
    port; raises ValueError for anything else."""
    host, port = server, "53"
    if server.startswith("["):
        host, _, rest = server[1:].partition("]")
        if rest:
            port = rest.removeprefix(":")
    elif server.count(":") == 1:
        host, _, port = server.partition(":")
    ipaddress.ip_address(host)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port {port!r}")
    return host, int(port)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def _system_resolver(name: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def _ask(server: str, name: str) -> list[str]:
    """The A and AAAA records of ``name`` at ``server`` (``host[:port]``, port 53)."""
    import dns.asyncresolver  # noqa: PLC0415 - the discovery extra, loaded when used
    import dns.exception  # noqa: PLC0415
    import dns.resolver  # noqa: PLC0415

    host, port = nameserver(server)
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.port = port
    resolver.lifetime = DNS_TIMEOUT
    addresses: list[str] = []
    for kind in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(name, kind)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        except dns.exception.DNSException as exc:
            raise OSError(f"DNS server {server} did not answer for {name}: {exc}") from None
        addresses += [record.to_text() for record in answer]
    if not addresses:
        raise OSError(f"DNS server {server} knows no address of {name}")
    return addresses
