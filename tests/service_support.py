"""Helpers of the service tests: a tiny trained checkpoint, a demo database, service processes,
a TCP proxy that can cut the database connection, and an audit of job completions."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg2

from config import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO_ROOT / "demo data"
DEMO_ENCODERS = REPO_ROOT / "preprocessing encoders"

TINY_MODEL = ("model.d_song=16", "model.d_album=8", "model.d_artist=8", "model.d_ff=32",
              "model.n_layers=1", "model.n_heads=2", "train.epochs=1", "train.device=cpu",
              "train.batch_size=2048")

AUDIT_SQL = """
CREATE TABLE IF NOT EXISTS job_done_log (
    job_id bigint NOT NULL,
    worker text,
    logged_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE OR REPLACE FUNCTION log_job_done() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_done_log (job_id, worker) VALUES (NEW.job_id, NEW.worker);
    RETURN NULL;
END;
$$;
CREATE OR REPLACE TRIGGER job_done_audit
    AFTER UPDATE OF status ON recommendation_jobs
    FOR EACH ROW WHEN (NEW.status = 'done' AND OLD.status <> 'done')
    EXECUTE FUNCTION log_job_done();
"""


def tiny_checkpoint(folder: Path) -> Path:
    """Train a one-epoch tiny model on the demo data into ``folder`` (once) and return best.pt."""
    checkpoint = folder / "run" / "best.pt"
    if checkpoint.is_file():
        return checkpoint
    data = folder / "data"
    subprocess.run([sys.executable, "preprocessing.py", "--source", "csv", "--data",
                    str(DEMO_DATA), "--encoders", str(DEMO_ENCODERS), "--out", str(data)],
                   cwd=REPO_ROOT, check=True, capture_output=True)
    overrides = [part for item in TINY_MODEL for part in ("--set", item)]
    subprocess.run([sys.executable, "train.py", "--preset", "demo", "--data", str(data),
                    "--run-dir", str(folder / "run"), "--seed", "1", "--quiet", *overrides],
                   cwd=REPO_ROOT, check=True, capture_output=True)
    return checkpoint


def settings_for(dsn: str, checkpoint: Path, **changes) -> Settings:
    """Test settings: fast polling and retries."""
    base = replace(Settings.from_env({}), database_url=dsn, model_path=checkpoint,
                   poll_seconds=0.1, retry_base_seconds=0.05, lease_seconds=30,
                   job_threads=2, db_connect_timeout=2)
    return replace(base, **changes)


def prepare_database(dsn: str) -> None:
    """Schema, service function and the demo tables in the database at ``dsn``."""
    import db

    db.init_database(dsn)
    with db.connected(dsn) as connection:
        db.load_csv_tables(connection, DEMO_DATA)


def execute(dsn: str, statement: str, parameters: Any = None) -> list[tuple]:
    """Run one statement in its own committed transaction; rows when it returns any."""
    connection = psycopg2.connect(dsn)
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute(statement, parameters)
            return cursor.fetchall() if cursor.description else []
    finally:
        connection.close()


def reset_queue(dsn: str) -> None:
    """Empty the job queue, the stored results and the completion audit."""
    execute(dsn, "TRUNCATE recommendation_jobs, recommendations RESTART IDENTITY")
    execute(dsn, AUDIT_SQL)
    execute(dsn, "TRUNCATE job_done_log")


def demo_playlist_ids(dsn: str, count: int) -> list[int]:
    """The first ``count`` demo playlist ids that have songs."""
    rows = execute(dsn, "SELECT DISTINCT playlist_id FROM playlist_songs ORDER BY playlist_id "
                        "LIMIT %s", (count,))
    return [row[0] for row in rows]


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.1,
               message: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_json(port: int, method: str, path: str, body: Any = None,
              timeout: float = 10.0) -> tuple[int, Any]:
    """One HTTP request to the service on loopback; (status, decoded JSON body or text)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = None if body is None else json.dumps(body)
        headers = {} if body is None else {"Content-Type": "application/json"}
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        data = response.read().decode()
        is_json = response.getheader("Content-Type", "").startswith("application/json")
        return response.status, json.loads(data) if is_json else data
    finally:
        connection.close()


def raw_exchange(port: int, data: bytes) -> tuple[str, str, str]:
    """Send raw bytes; (status line, content type, body) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    content_type = next((line.split(":", 1)[1].strip() for line in lines
                         if line.lower().startswith("content-type:")), "")
    return lines[0], content_type, body.decode("utf-8", "replace")


class ServiceProcess:
    """The service under gunicorn in its own process group, as `make serve` runs it."""

    def __init__(self, env: dict[str, str], log_path: Path, own_metrics_dir: bool = True,
                 gunicorn_args: tuple[str, ...] = ()) -> None:
        """Remember the environment; ``start`` launches it on a free port. With
        ``own_metrics_dir`` the test gives PROMETHEUS_MULTIPROC_DIR, else gunicorn.conf.py makes
        one; ``gunicorn_args`` go on gunicorn's command line (they override the config file)."""
        self.port = free_port()
        self.env = {**os.environ, **env, "HOST": "127.0.0.1", "PORT": str(self.port)}
        self.log_path = log_path
        self.own_metrics_dir = own_metrics_dir
        self.gunicorn_args = gunicorn_args
        self.process: subprocess.Popen | None = None

    def start(self) -> ServiceProcess:
        """Launch gunicorn and wait until /health answers."""
        if self.own_metrics_dir:
            self.env["PROMETHEUS_MULTIPROC_DIR"] = str(self.log_path.with_suffix(".metrics"))
            Path(self.env["PROMETHEUS_MULTIPROC_DIR"]).mkdir(exist_ok=True)
        else:
            self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py",
                 *self.gunicorn_args, "flask_app:create_app()"],
                cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        wait_until(self._healthy, timeout=90, interval=0.2, message="the service to start")
        return self

    def _healthy(self) -> bool:
        """True once /health answers 200; fails at once if the process died."""
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"service exited: {self.log_path.read_text()[-3000:]}")
        try:
            return http_json(self.port, "GET", "/health", timeout=2)[0] == 200
        except OSError:
            return False

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """An HTTP request to this service."""
        return http_json(self.port, method, path, body)

    def kill(self) -> None:
        """SIGKILL the whole process group (master and workers): a crash, no cleanup."""
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM and wait for a graceful exit (SIGKILL after 60 s)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()


class TcpProxy:
    """A loopback TCP proxy to PostgreSQL whose connections can be cut and restored, or frozen
    (every byte held in both directions, new connections accepted but silent) and thawed."""

    def __init__(self, target_host: str, target_port: int) -> None:
        """Pick a free port; ``start`` begins forwarding."""
        self.target = (target_host, target_port)
        self.port = free_port()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self._open = threading.Event()
        self._flowing = threading.Event()
        self._flowing.set()

    def start(self) -> TcpProxy:
        """Listen and forward every accepted connection to the target."""
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.1)
        self._open.set()
        threading.Thread(target=self._accept, args=(self._server,), daemon=True).start()
        return self

    def _accept(self, server: socket.socket) -> None:
        """Accept clients until the proxy is cut."""
        while self._open.is_set():
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()
        server.close()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        """Copy bytes one way until either side closes."""
        try:
            while data := source.recv(65536):
                self._flowing.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                self._close(end)

    def _close(self, end: socket.socket) -> None:
        """Shut down and close one socket, once."""
        with self._lock:
            self._sockets.discard(end)
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)
        end.close()

    def cut(self) -> None:
        """Refuse new connections and break every open one, as a network failure would."""
        self._open.clear()
        time.sleep(0.3)
        with self._lock:
            open_sockets = list(self._sockets)
        for end in open_sockets:
            self._close(end)

    def restore(self) -> None:
        """Accept connections again on the same port."""
        self.start()

    def freeze(self) -> None:
        """Hold every byte from now on, as a database whose processes are SIGSTOPped: sockets
        stay open, nothing answers, not even a new connection's handshake."""
        self._flowing.clear()

    def thaw(self) -> None:
        """Deliver what was held and forward again."""
        self._flowing.set()
