"""The buffering gunicorn worker: slow clients hold no thread, protocol errors answer JSON."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_support import free_port, raw_exchange

from http_worker import request_complete

REPO_ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
ECHO_APP = '''
import json

def app(environ, start_response):
    body = environ["wsgi.input"].read()
    out = json.dumps({"path": environ["PATH_INFO"], "bytes": len(body)}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(out)))])
    return [out]
'''
CONFIG = '''
import http_worker
http_worker.BufferingThreadWorker.read_seconds = 1.5
worker_class = "http_worker.BufferingThreadWorker"
workers = 1
threads = {threads}
keepalive = 5
bind = "127.0.0.1:{port}"
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """gunicorn with the buffering worker serving an echo app; yields its port."""
    folder = tmp_path_factory.mktemp("http_worker")
    port = free_port()
    (folder / "echo.py").write_text(ECHO_APP)
    (folder / "conf.py").write_text(CONFIG.format(threads=THREADS, port=port))
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--config", str(folder / "conf.py"), "echo:app"],
        cwd=folder, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        process.kill()
        pytest.fail("gunicorn with the buffering worker did not start")
    try:
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def get(port: int, path: str, body: bytes | None = None) -> tuple[int, dict]:
    """One request with a 5 s client timeout (a hang fails the test instead of stalling it)."""
    client = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    client.request("POST" if body is not None else "GET", path, body=body)
    response = client.getresponse()
    result = response.status, json.loads(response.read())
    client.close()
    return result


def test_half_sent_requests_hold_no_thread(server: int) -> None:
    slow = []
    for index in range(4 * THREADS):
        sock = socket.create_connection(("127.0.0.1", server), timeout=5)
        if index % 2:
            sock.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
        else:
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
        slow.append(sock)
    try:
        time.sleep(0.3)
        assert get(server, "/health") == (200, {"path": "/health", "bytes": 0})
        assert get(server, "/echo", b"x" * 5000) == (200, {"path": "/echo", "bytes": 5000})
    finally:
        for sock in slow:
            sock.close()


def test_a_client_too_slow_to_send_its_request_is_disconnected(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
        assert sock.recv(100) == b""


def test_a_body_sent_in_pieces_and_keep_alive_both_work(server: int) -> None:
    body = b"y" * 100_000
    with socket.create_connection(("127.0.0.1", server), timeout=5) as sock:
        sock.sendall(f"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
                     .encode())
        for start in range(0, len(body), 30_000):
            sock.sendall(body[start:start + 30_000])
            time.sleep(0.05)
        sock.sendall(b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.count(b"HTTP/1.1 200") == 2
    assert b'"bytes": 100000' in answer and b'"path": "/b"' in answer


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(120)) + b"\r\n", "431"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 12x\r\n\r\n", "400"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", "431"),
])
def test_gunicorn_protocol_errors_answer_json(server: int, request_bytes: bytes,
                                              status: str) -> None:
    status_line, content_type, text = raw_exchange(server, request_bytes)
    body = json.loads(text)
    assert status_line.split()[1] == status
    assert content_type == "application/json"
    assert isinstance(body["error"], str) and body["error"]


def test_request_complete_reads_content_length() -> None:
    head = b"POST / HTTP/1.1\r\nHost: x\r\ncontent-length: 3\r\n\r\n"
    assert not request_complete(b"POST / HTTP/1.1\r\nHost", 1000)
    assert not request_complete(head + b"ab", 1000)
    assert request_complete(head + b"abc", 1000)
    assert request_complete(b"x" * 1001, 1000)
