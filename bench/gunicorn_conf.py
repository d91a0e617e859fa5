"""gunicorn settings of the ``web`` process."""

import os
import tempfile

# Prometheus multiprocess mode: every worker writes its samples to one directory, so that
# /metrics, served by any worker, reports all of them.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="eventflow-metrics-")

workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
threads = int(os.environ.get("WEB_THREADS", "4"))
keepalive = 5
# Each worker listens on a socket of its own (SO_REUSEPORT) and the kernel spreads new
# connections evenly among them. With one shared socket, whichever worker wakes first
# takes a burst of new connections, and kept-alive clients then stay with it: in one
# load run out of four, one worker served every connection while the other idled
# (bench/README.md).
reuse_port = True
# No runtime control socket: it would be one per user, shared by every gunicorn started.
control_socket_disable = True
timeout = 30
graceful_timeout = 20


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
