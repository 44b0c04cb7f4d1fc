"""gunicorn settings for `make serve` (gunicorn --config gunicorn.conf.py "flask_app:create_app()").

Binds HOST:PORT (default 127.0.0.1:8000) with WORKERS processes of THREADS threads each.
The master loads the model once before it forks (and again on SIGHUP, before the new workers),
so all workers share its pages copy-on-write; a load that fails leaves the service running and
not ready, with the reason on /ready. Every worker builds its database pool and starts its own
queue worker threads after the fork (the master never does); SIGTERM lets them finish the batch
in hand before the process exits.
Prometheus metrics of all processes are aggregated through PROMETHEUS_MULTIPROC_DIR, which
is created here when it is not set (and removed again when gunicorn exits; a folder the user
gave is kept); it must be set before prometheus_client is imported.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# The folder made here is remembered in the environment, so that a reload (SIGHUP), which runs
# this file again with PROMETHEUS_MULTIPROC_DIR already set, still knows it is ours to remove.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="b4mr-metrics-")
    os.environ["B4MR_CREATED_METRICS_DIR"] = os.environ["PROMETHEUS_MULTIPROC_DIR"]

from prometheus_client import multiprocess

import service
from config import Settings
from flask_app import EXTENSION_KEY
from http_worker import BufferingThreadWorker

_settings = Settings.from_env()

bind = f"{_settings.host}:{_settings.port}"
workers = _settings.workers
# gthread, but each request is read whole before a thread sees it (slow clients hold no
# thread; one that has not sent its request within REQUEST_READ_SECONDS is disconnected)
worker_class = "http_worker.BufferingThreadWorker"
BufferingThreadWorker.read_seconds = _settings.request_read_seconds
threads = _settings.threads
timeout = 60
graceful_timeout = int(_settings.shutdown_seconds) + 10
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")
logging.basicConfig(level=loglevel.upper(),
                    format="%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s")


def on_starting(server: Any) -> None:
    """Start from an empty metrics folder, so counters of an earlier run do not linger, and
    load the model once for all workers."""
    for stale in Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).glob("*.db"):
        stale.unlink()
    service.preload_model(_settings)


def on_reload(server: Any) -> None:
    """SIGHUP: load the checkpoint again (it may have been replaced) for the new workers."""
    service.preload_model(Settings.from_env())


def post_fork(server: Any, worker: Any) -> None:
    """Give torch back its thread count, set to one in the master for the load."""
    service.after_fork()


def on_exit(server: Any) -> None:
    """Remove the metrics folder made above at shutdown; one the user gave stays."""
    created = os.environ.get("B4MR_CREATED_METRICS_DIR")
    if created and created == os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        shutil.rmtree(created, ignore_errors=True)


def post_worker_init(worker: Any) -> None:
    """Start the queue worker threads inside each worker process, after the fork."""
    worker.wsgi.extensions[EXTENSION_KEY].start_workers()


def worker_exit(server: Any, worker: Any) -> None:
    """Stop claiming and finish the batches in hand before the worker process exits."""
    app = getattr(worker, "wsgi", None)
    if app is not None:
        app.extensions[EXTENSION_KEY].stop_workers()


def child_exit(server: Any, worker: Any) -> None:
    """Drop the live gauges of a worker process that ended."""
    multiprocess.mark_process_dead(worker.pid)
