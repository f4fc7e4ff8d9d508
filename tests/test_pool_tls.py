"""The pool manager over TLS: a test CA (trustme), a server that asks for client
certificates (mutual TLS), and HTTP/2 end to end against a local hypercorn server."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig

from corral.actors.pool import PoolManager, ServiceOptions
from corral.config import Config, ManagerSection
from corral.errors import BackendUnavailable, ConfigError
from corral.messages.pool import HttpRequest
from corral.system import System


class Loop:
    """An event loop in a thread of its own, for the test servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """PEM files: the CA, a client certificate and its key, and another CA's client."""
    folder = tmp_path_factory.mktemp("tls")
    client = ca.issue_cert("billing-client@corral.test", common_name="billing-client")
    stranger = trustme.CA().issue_cert("stranger@elsewhere.test")
    paths = {
        "ca": folder / "ca.pem",
        "client_cert": folder / "client.pem",
        "client_key": folder / "client.key",
        "client_both": folder / "client-and-key.pem",
        "stranger": folder / "stranger.pem",
        "other_ca": folder / "other-ca.pem",
    }
    ca.cert_pem.write_to_path(str(paths["ca"]))
    client.cert_chain_pems[0].write_to_path(str(paths["client_cert"]))
    client.private_key_pem.write_to_path(str(paths["client_key"]))
    client.private_key_and_cert_chain_pem.write_to_path(str(paths["client_both"]))
    stranger.private_key_and_cert_chain_pem.write_to_path(str(paths["stranger"]))
    trustme.CA().cert_pem.write_to_path(str(paths["other_ca"]))
    return {name: str(path) for name, path in paths.items()}


def _server_context(ca: trustme.CA, *, client_certs: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    if client_certs:
        ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def _who(request: web.Request) -> web.Response:
    """Answers with the client certificate's common name (None without one)."""
    peer = request.transport.get_extra_info("peercert") if request.transport else None
    subject = dict(item[0] for item in peer["subject"]) if peer else {}
    return web.json_response({"client": subject.get("commonName"), "version": request.version[0]})


@pytest.fixture(scope="module")
def servers(ca: trustme.CA) -> Iterator[dict[str, str]]:
    """``tls``: an https server; ``mutual``: one that requires a client certificate."""
    loop = Loop()

    async def start() -> tuple[web.AppRunner, dict[str, str]]:
        app = web.Application()
        app.router.add_get("/who", _who)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        urls = {}
        for name, client_certs in (("tls", False), ("mutual", True)):
            site = web.TCPSite(
                runner, "127.0.0.1", 0, ssl_context=_server_context(ca, client_certs=client_certs)
            )
            await site.start()
            server: Any = site._server
            urls[name] = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return runner, urls

    runner, urls = loop.run(start())
    yield urls
    loop.run(runner.cleanup())
    loop.close()


@contextmanager
def pool(**service: Any) -> Iterator[System]:
    options = {"services": {"billing": {"retry_attempts": 1, **service}}}
    config = Config().replace(managers={"pool": ManagerSection(options=options)})
    with System(config, managers=[PoolManager]) as system:
        yield system


def who(system: System) -> dict[str, Any]:
    answer = system.ask(HttpRequest(service="billing", path="/who"), timeout=10)
    assert answer.status == 200
    result: dict[str, Any] = answer.json()
    return result


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_mutual_tls_with_the_services_own_ca_and_client_certificate(
    servers: dict[str, str], files: dict[str, str], transport: str
) -> None:
    with pool(
        base_urls=[servers["mutual"]],
        transport=transport,
        ca_file=files["ca"],
        client_cert=files["client_cert"],
        client_key=files["client_key"],
    ) as system:
        assert who(system) == {"client": "billing-client", "version": 1}
    with pool(  # the key in the certificate's file
        base_urls=[servers["mutual"]], transport=transport, ca_file=files["ca"],
        client_cert=files["client_both"],
    ) as system:  # fmt: skip
        assert who(system)["client"] == "billing-client"


def refusal(**service: Any) -> str:
    """Why the pool could not call ``service``."""
    with pool(**service) as system, pytest.raises(BackendUnavailable) as refused:
        who(system)
    return refused.value.message


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_a_certificate_the_service_does_not_trust_is_refused_with_the_reason(
    servers: dict[str, str], files: dict[str, str], transport: str
) -> None:
    tls = {"base_urls": [servers["tls"]], "transport": transport}
    assert "certificate verify failed" in refusal(**tls)  # the usual CAs
    assert "certificate verify failed" in refusal(**tls, ca_file=files["other_ca"])
    for trusting in ({"ca_file": files["ca"]}, {"verify": False}):
        with pool(**tls, **trusting) as system:
            assert who(system) == {"client": None, "version": 1}
    mutual = {"base_urls": [servers["mutual"]], "transport": transport, "ca_file": files["ca"]}
    refusal(**mutual)  # no client certificate
    refusal(**mutual, client_cert=files["stranger"])  # one from another CA


def test_tls_settings_are_checked_with_the_config(files: dict[str, str], tmp_path: Path) -> None:
    url = ["https://billing.internal"]
    with pytest.raises(ConfigError, match="ca_file: no such file"):
        ServiceOptions(base_urls=url, ca_file=str(tmp_path / "missing.pem"))
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(ConfigError, match="ca_file: cannot load it as PEM certificates"):
        ServiceOptions(base_urls=url, ca_file=str(not_pem))
    with pytest.raises(ConfigError, match="client_cert: cannot load it"):
        ServiceOptions(base_urls=url, client_cert=files["client_cert"])  # its key is elsewhere
    with pytest.raises(ConfigError, match="client_key: needs client_cert"):
        ServiceOptions(base_urls=url, client_key=files["client_key"])
    with pytest.raises(ConfigError, match="ca_file: has no use with verify = false"):
        ServiceOptions(base_urls=url, ca_file=files["ca"], verify=False)


async def _h2_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = json.dumps({"client": None, "version": scope["http_version"]}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def h2_server(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """hypercorn over TLS, offering h2 and http/1.1 by ALPN, on a socket bound here."""
    folder = tmp_path_factory.mktemp("h2")
    server_cert = ca.issue_cert("127.0.0.1")
    server_cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    server_cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    config = HypercornConfig()
    config.bind = [f"fd://{listening.detach()}"]  # hypercorn's to close
    config.certfile, config.keyfile = str(folder / "cert.pem"), str(folder / "key.pem")
    config.accesslog = config.errorlog = None
    loop = Loop()
    stop = asyncio.Event()
    served = asyncio.run_coroutine_threadsafe(
        serve(_h2_app, config, shutdown_trigger=stop.wait, mode="asgi"),  # type: ignore[arg-type]
        loop.loop,
    )
    yield f"https://127.0.0.1:{port}"
    loop.loop.call_soon_threadsafe(stop.set)
    served.result(10)
    loop.close()


def test_http2_end_to_end_against_a_local_h2_server(h2_server: str, files: dict[str, str]) -> None:
    with pool(base_urls=[h2_server], http2=True, ca_file=files["ca"]) as system:
        assert who(system) == {"client": None, "version": "2"}
    with pool(base_urls=[h2_server], ca_file=files["ca"]) as system:  # HTTP/1.1 by default
        assert who(system) == {"client": None, "version": "1.1"}
