"""Run locustfile.py's users against `host` until they have made `requests` requests (or
`timeout_s` passed), then print the totals as JSON. A count, not a run time: on a busy
machine a 4-second `--run-time` once ended before any user had spawned.

Runs in a subprocess of its own: importing locust monkey-patches the whole process (gevent).
Usage: python tests/locust_until.py HOST REQUESTS TIMEOUT_S
"""

from __future__ import annotations

import inspect
import json
import sys
import time

import gevent
from locust import HttpUser
from locust.env import Environment

import locustfile


def main(host: str, requests: int, timeout_s: float) -> None:
    users = [
        cls
        for _, cls in inspect.getmembers(locustfile, inspect.isclass)
        if issubclass(cls, HttpUser) and cls is not HttpUser
    ]
    env = Environment(user_classes=users, host=host)
    runner = env.create_local_runner()
    runner.start(len(users) * 2, spawn_rate=len(users) * 2)
    deadline = time.monotonic() + timeout_s
    while env.stats.total.num_requests < requests and time.monotonic() < deadline:
        gevent.sleep(0.2)
    runner.quit()
    by_name = {f"{m} {n}": s.num_requests for (n, m), s in env.stats.entries.items()}
    print(
        json.dumps(
            {
                "requests": env.stats.total.num_requests,
                "failures": env.stats.total.num_failures,
                "errors": [str(error.error) for error in env.stats.errors.values()],
                "by_name": by_name,
                "users": [cls.__name__ for cls in users],
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
