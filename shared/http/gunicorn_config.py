"""The gunicorn settings every HTTP service runs with.

`shared.http.server.run_http` applies every gunicorn setting named here and adds the address, the workers and the
threads, which this module leaves out: `serve` takes them from `Settings` (HOST, PORT, WEB_CONCURRENCY, WEB_THREADS).
Given to gunicorn alone (`gunicorn -c python:shared.http.gunicorn_config`), the module sets only what is named here:
gunicorn's defaults then bind 127.0.0.1:8000 with one worker of one thread.

There is no `post_fork` hook: nothing that holds a connection is built before the fork (`preload_app` is off and
each worker calls the app factory itself), so no worker inherits a database pool or a broker connection to dispose.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import sentry_sdk

from shared.core.heap import freeze_startup_heap

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
FLUSH_SECONDS = 5.0

# gunicorn's gthread worker, answering its own refusals (an oversized header, a malformed request) as problem+json.
worker_class = "shared.http.worker.ProblemThreadWorker"
preload_app = False
# A worker that has not reported for this long is stuck (gthread workers report between requests): it is replaced.
timeout = 60
# On SIGTERM, requests in progress get this long to finish; the container's stop grace period must be longer.
graceful_timeout = 30
keepalive = 2
# Workers are replaced after this many requests, at staggered moments, so slow growth in memory never accumulates.
max_requests = 10_000
max_requests_jitter = 1_000
accesslog = "-"
# The request id is the X-Request-ID every response carries: the access log line joins the app's logs and Sentry.
# The path without its query string: Bolna's webhooks carry the webhook secret in theirs (`?token=`).
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms request_id=%({x-request-id}o)s'
errorlog = "-"
loglevel = "info"
control_socket_disable = True  # several services share a host: no shared control socket path


def post_worker_init(worker: object) -> None:
    """Once a worker has built its app, what it built is left out of the garbage collector's walks."""
    freeze_startup_heap()


def worker_exit(server: object, worker: object) -> None:
    """On SIGTERM a worker finishes its requests, then sends what Sentry still holds before it exits."""
    sentry_sdk.flush(timeout=FLUSH_SECONDS)


def available_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The CPUs this process may use: the ones it may run on, capped by its cgroup's CPU quota (a container's
    `cpus:` or a pod's CPU limit), rounded up."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()
    except (OSError, ValueError):  # no cgroup v2 CPU controller here
        return cpus
    if quota == "max":
        return cpus
    return max(1, min(cpus, math.ceil(int(quota) / int(period))))


def default_workers(cpus: int) -> int:
    """One worker per CPU: a worker's threads share one interpreter lock, so more workers than CPUs only add memory
    and database connections. At least two, so a worker being replaced never leaves the service without one."""
    return max(2, cpus)
