"""The socket side of the in-memory service: an HTTP/1.1 server over the API, with faults and records.

:class:`Server` accepts connections on a thread of its own and serves each on another; ``_Handler``
parses a request, consults the :class:`~heksher_shm.testing._faults.FaultTable`, asks the
:class:`~heksher_shm.testing._api.Api` for the response (unless a fault answers instead), sends it and
records the request in the :class:`~heksher_shm.testing._faults.RequestLog`.  Stopping is prompt:
the accept loop wakes on a socket pair, and open keep-alive connections are cut.
"""

from __future__ import annotations

import contextlib
import http
import logging
import selectors
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from heksher_shm.testing._api import (
    JSON_TYPE,
    TEXT_TYPE,
    Api,
    Request,
    Response,
    crash_response,
    json_response,
    text_response,
)
from heksher_shm.testing._faults import FaultKind, FaultTable, RequestLog, RequestRecord

__all__ = ["Server"]

_LOG = logging.getLogger("heksher_shm.testing")


class Server(ThreadingHTTPServer):
    """A threading HTTP server that tracks its connections so that ``stop()`` can cut them."""

    daemon_threads = True
    block_on_close = False  # we join our own threads, with a deadline

    def __init__(
        self,
        address: tuple[str, int],
        api: Api,
        *,
        faults: FaultTable,
        log: RequestLog,
        stopping: threading.Event,
    ) -> None:
        self.api = api
        self.faults = faults
        self.log = log
        self.stopping = stopping  # set by the service as it stops: wakes handlers sleeping in a delay
        self._tracked = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._connection_threads: set[threading.Thread] = set()
        self._wake_reader, self._wake_writer = socket.socketpair()
        super().__init__(address, _Handler)  # a failed bind calls server_close(), closing the pair too

    def run(self) -> None:
        """Accept connections until :meth:`wake` is called.

        Unlike ``serve_forever()``, which notices ``shutdown()`` only at its next poll, this loop waits on
        the listening socket and a wake-up socket together, so stopping costs no poll interval.
        """
        # non-blocking accept: a client that gives up between select() and accept() must not hang the loop
        self.socket.setblocking(False)
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is self._wake_reader:
                        return
                    self._accept()

    def _accept(self) -> None:
        try:
            request, client_address = self.get_request()
        except OSError:
            return  # nothing to accept after all
        request.setblocking(True)  # handlers read and write in blocking mode
        try:
            self.process_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)

    def wake(self) -> None:
        """Make :meth:`run` return."""
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"x")

    def server_close(self) -> None:
        super().server_close()
        self._wake_reader.close()
        self._wake_writer.close()

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            daemon=True,
            name=f"heksher-shm-testing-{client_address}",
        )
        with self._tracked:
            self._connections.add(request)
            self._connection_threads.add(thread)
        thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self._tracked:
                self._connection_threads.discard(threading.current_thread())

    def shutdown_request(self, request: Any) -> None:
        with self._tracked:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # connections cut by stop() or by clients are routine here; keep stderr quiet
        _LOG.debug("connection from %s ended with an error", client_address, exc_info=True)

    def cut_connections(self) -> None:
        """Shut down every open client connection, waking handler threads blocked on reads."""
        with self._tracked:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by its handler
                connection.shutdown(socket.SHUT_RDWR)

    def join_threads(self, timeout: float) -> None:
        """Wait (up to ``timeout`` seconds in all) for the connection threads to finish."""
        deadline = time.monotonic() + timeout
        with self._tracked:
            threads = list(self._connection_threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class _Handler(BaseHTTPRequestHandler):
    """One connection: each request goes through the fault table, then the API, and is recorded."""

    protocol_version = "HTTP/1.1"  # keep-alive: clients hold long-lived connections
    # One buffered write per response and no Nagle: headers and body sent as separate small segments
    # otherwise meet the peer's delayed ACK and cost ~40 ms per request on a keep-alive connection.
    wbufsize = -1
    disable_nagle_algorithm = True
    server: Server

    def version_string(self) -> str:
        return "uvicorn"  # the Server header of a real Heksher

    def log_message(self, format: str, *args: Any) -> None:
        _LOG.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_GET
    do_PUT = do_GET
    do_PATCH = do_GET
    do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _serve(self) -> None:
        server = self.server
        received = time.monotonic()
        try:
            body = self._read_body()
        except ValueError:
            self.close_connection = True
            self._send(text_response(400, "bad request body framing"))
            return
        url = urlsplit(self.path)
        path = unquote(url.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        method = self.command.upper()

        def record(status: int | None, fault: FaultKind | None) -> None:
            server.log.append(RequestRecord(method, path, query, url.query, status, received, fault))

        fault = server.faults.pick(method, path)
        if fault is not None and fault.delay > 0 and server.stopping.wait(fault.delay):
            record(None, fault.kind)
            self.close_connection = True
            return
        kind = fault.kind if fault is not None else None
        request = Request(method, path, query, _HeaderView(self.headers), body)

        if fault is None or kind in ("delay", "truncated_body", "wrong_etag"):
            if fault is not None and kind == "wrong_etag":
                request.etag_override = fault.etag
            try:
                response = server.api.handle(request)
            except Exception:  # a bug here: answer like uvicorn does, and say so
                _LOG.exception("in-memory Heksher service failed on %s %s", method, path)
                response = crash_response()
        elif kind == "status":
            assert fault.status is not None
            response = _fault_body_response(fault.status, fault.body)
        elif kind == "malformed_body":
            raw = fault.body if isinstance(fault.body, bytes) else str(fault.body).encode()
            response = Response(200, raw, [("content-type", JSON_TYPE)])
        elif kind == "wrong_shape":
            response = json_response(200, _plain_json(fault.body))
        elif kind == "huge_body":
            response = json_response(200, {"settings": {}, "padding": "x" * max(0, fault.size - 30)})
        else:  # dropped_connection
            record(None, kind)
            self.close_connection = True
            return

        record(response.status, kind)
        if response.crashed:
            self.close_connection = True
            self._send_chunked(response)
        elif kind == "truncated_body":
            self.close_connection = True
            self._send(response, truncate=True)
        else:
            self._send(response)

    def _send(self, response: Response, *, truncate: bool = False) -> None:
        self.send_response(response.status)
        for name, value in response.headers:
            self.send_header(name, value)
        body = response.body
        if response.status not in (204, 304):  # these never carry a body, nor its length
            # a truncated body still promises its full length (at least one byte more than is sent)
            self.send_header("content-length", str(max(len(body), 1) if truncate else len(body)))
        if self.close_connection:
            self.send_header("connection", "close")
        self.end_headers()
        if body and response.status not in (204, 304):
            self.wfile.write(body[: len(body) // 2] if truncate else body)
        self.wfile.flush()

    def _send_chunked(self, response: Response) -> None:
        """Send the body as one chunk, as uvicorn streams its error page."""
        self.send_response(response.status)
        for name, value in response.headers:
            self.send_header(name, value)
        self.send_header("transfer-encoding", "chunked")
        if self.close_connection:
            self.send_header("connection", "close")
        self.end_headers()
        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(response.body), response.body))
        self.wfile.flush()


class _HeaderView(Mapping[str, str]):
    """Case-insensitive read access to the request headers."""

    def __init__(self, message: Any) -> None:
        self._headers: dict[str, str] = {name.lower(): str(value) for name, value in message.items()}

    def __getitem__(self, key: str) -> str:
        return self._headers[key.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._headers)

    def __len__(self) -> int:
        return len(self._headers)


def _fault_body_response(
    status: int, body: bytes | str | Mapping[str, Any] | Sequence[Any] | None
) -> Response:
    if body is None:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "Injected fault"
        return text_response(status, phrase)
    if isinstance(body, bytes):
        return Response(status, body, [("content-type", TEXT_TYPE)])
    if isinstance(body, str):
        return text_response(status, body)
    return json_response(status, _plain_json(body))


def _plain_json(body: object) -> Any:
    """Mappings and sequences given to a :class:`Fault` as the dicts and lists ``json`` can write."""
    if isinstance(body, Mapping):
        return dict(body)
    if isinstance(body, Sequence) and not isinstance(body, (str, bytes)):
        return list(body)
    return body
