"""Serving an ASGI application with uvicorn inside the simulator's own event loop.

The listening socket is bound before uvicorn starts, so port 0 gives an ephemeral port
that is known at once (:attr:`HttpServer.port`). uvicorn runs as a task of the running loop;
signals stay with the simulator's owner (the CLI stops the whole gateway on Ctrl-C).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

log = logging.getLogger(__name__)

#: Seconds an idle keep-alive connection stays open.
KEEP_ALIVE_S = 60
#: Seconds :meth:`HttpServer.stop` waits for uvicorn before dropping connections.
STOP_TIMEOUT_S = 5.0


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: the simulator's owner handles signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0 = any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


class HttpServer:
    """One ASGI application served by uvicorn (HTTP/1.1 via h11) on ``host:port``; TLS
    when ``certfile`` and ``keyfile`` are given."""

    def __init__(self, app: ASGIApp, host: str, port: int, *,
                 certfile: Path | None = None, keyfile: Path | None = None,
                 name: str = "http"):
        self.name = name
        self.host = host
        self.tls = certfile is not None
        self._socket = bind(host, port)
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app, http="h11", lifespan="off", log_config=None, access_log=False,
            server_header=False, proxy_headers=False, timeout_keep_alive=KEEP_ALIVE_S,
            ssl_certfile=str(certfile) if certfile else None,
            ssl_keyfile=str(keyfile) if keyfile else None,
        )
        self._server = _Uvicorn(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def sockets(self) -> list[socket.socket]:
        return [self._socket]

    async def start(self) -> HttpServer:
        """Serve until :meth:`stop`; returns once uvicorn accepts connections.

        uvicorn's own steps (``startup``, ``main_loop`` for its once-a-second
        housekeeping such as the Date header, ``shutdown``) are driven here rather than
        through ``serve``, so that stopping does not wait for the main loop's next tick."""
        server = self._server
        if not server.config.loaded:
            server.config.load()
        server.lifespan = server.config.lifespan_class(server.config)
        try:
            await server.startup(sockets=[self._socket])
        except BaseException:
            self._socket.close()
            raise
        self._task = asyncio.get_running_loop().create_task(
            server.main_loop(), name=f"uvicorn-{self.name}")
        log.info("%s listening on %s://%s:%d", self.name, "https" if self.tls else "http",
                 self.host, self.port)
        return self

    async def stop(self) -> None:
        """Stop at once: no new connections, the open ones dropped (a TLS peer that never
        answers the close handshake must not hold the simulator up)."""
        if self._task is None:
            self._socket.close()
            return
        server = self._server
        server.should_exit = True
        server.force_exit = True  # do not wait for idle keep-alive connections
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        try:
            for conn in list(server.server_state.connections):
                transport = getattr(conn, "transport", None)
                if transport is not None:
                    transport.abort()
            await asyncio.wait_for(server.shutdown(sockets=[self._socket]), STOP_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a failed or slow shutdown must not stop ours
            log.warning("%s server did not stop cleanly", self.name, exc_info=True)
        finally:
            self._socket.close()
            self._task = None
