"""A gunicorn worker that reads each request whole before a thread sees it, and errs in JSON.

gunicorn's ``gthread`` worker hands a connection to a thread as soon as its first byte
arrives; the thread then blocks reading the rest, so a few clients that send half a request
and wait hold every thread (gunicorn's docs advise a buffering proxy in front for this).
This worker buffers in its event loop instead: a connection reaches the thread pool only
once its headers and its ``Content-Length`` body are in memory, and one that has not
delivered a whole request within ``read_seconds`` is closed. gunicorn's own protocol errors
(request line or headers too long, bad ``Content-Length``) are answered as JSON, like the
application's errors.
"""

from __future__ import annotations

import contextlib
import errno
import json
import selectors
import socket
import time
from functools import partial
from typing import Any

from gunicorn import http
from gunicorn.http import errors as http_errors
from gunicorn.workers.gthread import TConn, ThreadWorker

HEADER_END = b"\r\n\r\n"
RECV_BYTES = 65536
# Bodies larger than this are not buffered: the thread gets the request at once and the
# application answers 413 from the headers alone (its limit is far below this).
MAX_BUFFERED_BODY = 1 << 20
DEFAULT_READ_SECONDS = 10.0

# gunicorn's status for each protocol error it raises before the application runs.
ERROR_STATUS: tuple[tuple[type[BaseException], int, str], ...] = (
    (http_errors.LimitRequestHeaders, 431, "Request Header Fields Too Large"),
    (http_errors.ForbiddenProxyRequest, 403, "Forbidden"),
    (http_errors.UnsupportedTransferCoding, 501, "Not Implemented"),
    (http_errors.ConfigurationProblem, 500, "Internal Server Error"),
    (http_errors.ParseException, 400, "Bad Request"),
)


class BufferedSource:
    """What the request parser reads from: bytes buffered by the event loop, then the socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def recv(self, size: int) -> bytes:
        """Buffered bytes first; the socket (blocking, in a thread) only once they are used up."""
        if self.buffer:
            chunk = bytes(self.buffer[:size])
            del self.buffer[:size]
            return chunk
        return self.sock.recv(size)


def request_complete(buffer: bytes | bytearray, header_limit: int) -> bool:
    """True when ``buffer`` holds a whole request, or enough for the parser to refuse it."""
    end = buffer.find(HEADER_END)
    if end < 0:
        return len(buffer) > header_limit
    length = 0
    for line in bytes(buffer[:end]).split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            text = value.strip()
            if not text.isdigit():
                return True
            length = int(text)
    if length > MAX_BUFFERED_BODY:
        return True
    return len(buffer) >= end + len(HEADER_END) + length


def error_status(error: BaseException) -> tuple[int, str]:
    """gunicorn's status code and reason for one of its protocol errors (500 otherwise)."""
    for kind, status, reason in ERROR_STATUS:
        if isinstance(error, kind):
            return status, reason
    return 500, "Internal Server Error"


class BufferingThreadWorker(ThreadWorker):
    """``gthread`` with requests buffered in the event loop and protocol errors in JSON."""

    read_seconds = DEFAULT_READ_SECONDS

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        """Refuse TLS: this worker reads raw bytes before the handshake a TLS socket needs."""
        super().check_config(cfg, log)
        if cfg.is_ssl:
            raise http_errors.ConfigurationProblem(
                "BufferingThreadWorker serves plain HTTP; terminate TLS in front of it")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading: dict[TConn, float] = {}
        cfg = self.cfg
        self._header_limit = (cfg.limit_request_line + 4
                              + cfg.limit_request_fields * (cfg.limit_request_field_size + 2))

    def accept(self, server: Any, listener: socket.socket) -> None:
        """Accept a connection and wait, in the event loop, for its whole first request."""
        try:
            sock, client = listener.accept()
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        conn = TConn(self.cfg, sock, client, server)
        conn.source = BufferedSource(sock)
        self.nr_conns += 1
        self._wait_for_request(conn)

    def _wait_for_request(self, conn: TConn, idle_seconds: float | None = None) -> None:
        """Register ``conn`` for reading; it is closed if no whole request comes in time."""
        seconds = self.read_seconds if idle_seconds is None else idle_seconds
        with self._lock:
            self._reading[conn] = time.monotonic() + seconds
            self.poller.register(conn.sock, selectors.EVENT_READ,
                                 partial(self._on_readable, conn))

    def _on_readable(self, conn: TConn, client: socket.socket) -> None:
        """Buffer what arrived; hand the connection to a thread once a request is whole."""
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        source: BufferedSource = conn.source
        if data:
            if not source.buffer:
                with self._lock:
                    self._reading[conn] = time.monotonic() + self.read_seconds
            source.buffer += data
            if not request_complete(source.buffer, self._header_limit):
                return
        self._stop_reading(conn)
        if not data and not source.buffer:
            self._drop(conn)
            return
        self._enqueue(conn)

    def _stop_reading(self, conn: TConn) -> None:
        """Take ``conn`` out of the poller, the read deadlines and the kept-alive list."""
        with self._lock:
            self._reading.pop(conn, None)
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.poller.unregister(conn.sock)
            with contextlib.suppress(ValueError):
                self._keep.remove(conn)

    def _enqueue(self, conn: TConn) -> None:
        """Give the buffered request to the thread pool, reading through ``conn.source``."""
        if conn.parser is None:
            conn.parser = http.RequestParser(self.cfg, conn.source, conn.client)
        conn.init()
        future = self.tpool.submit(self.handle, conn)
        self._wrap_future(future, conn)

    def _drop(self, conn: TConn) -> None:
        """Close a connection that is not in the poller any more."""
        self.nr_conns -= 1
        conn.close()

    def finish_request(self, fs: Any) -> None:
        """Like gthread's, but a kept-alive connection buffers its next request too."""
        if fs.cancelled():
            self._drop(fs.conn)
            return
        try:
            keepalive, conn = fs.result()
        except Exception:
            self._drop(fs.conn)
            return
        if keepalive and self.alive:
            conn.sock.setblocking(False)
            conn.set_timeout()
            with self._lock:
                self._keep.append(conn)
            self._wait_for_request(conn, idle_seconds=self.cfg.keepalive)
        else:
            self._drop(conn)

    def murder_keepalived(self) -> None:
        """Close idle kept-alive connections and those too slow to send a whole request."""
        now = time.monotonic()
        with self._lock:
            expired = [conn for conn, deadline in self._reading.items() if deadline <= now]
        for conn in expired:
            self._stop_reading(conn)
            self._drop(conn)

    def handle_error(self, req: Any, client: socket.socket, addr: Any, exc: BaseException) -> None:
        """Answer gunicorn's own errors with a JSON body, as the application answers its own."""
        status, reason = error_status(exc)
        if status == 500:
            self.log.exception("Error handling request")
            message = "internal server error"
        else:
            self.log.warning("Invalid request from %s: %s", (addr or ("",))[0], exc)
            message = f"{reason.lower()}: {exc}"
        body = json.dumps({"error": message}).encode("utf-8")
        head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        with contextlib.suppress(OSError):
            client.sendall(head.encode("latin-1") + body)
