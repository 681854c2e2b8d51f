"""`make run`: the whole stack in one terminal, stopped cleanly by Ctrl-C.

Starts Redis (an embedded redis-server with its data and AOF under data/, unless REDIS_URL
names a server), one `huey_consumer core.huey` and uvicorn, then waits. On Ctrl-C or SIGTERM it
stops them in order: the API first (no new work), the consumer gracefully (SIGINT lets running
tasks finish), then Redis (which flushes its AOF).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from hueyserve.dev.redis_server import EmbeddedRedis
from hueyserve.settings import settings

METRICS_DIR = Path("data/metrics")

logger = logging.getLogger("hueyserve.dev.stack")
STOP_TIMEOUT_S = 30.0


def start(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    logger.info("starting: %s", " ".join(command))
    # A session of its own: Ctrl-C reaches only us, and we stop the children in order.
    return subprocess.Popen(command, env=env, start_new_session=True)


def stop(process: subprocess.Popen[bytes], name: str = "process") -> int:
    """Ctrl-C (graceful for both uvicorn and huey_consumer), then kill if it hangs; returns
    the exit status. Also used by the tests and the benchmark."""
    if process.poll() is not None:
        return process.returncode
    logger.info("stopping %s (pid %s)", name, process.pid)
    process.send_signal(signal.SIGINT)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        logger.warning("%s did not stop within %ss; killing it", name, STOP_TIMEOUT_S)
        process.kill()
        process.wait()
    return process.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    env = dict(os.environ)
    # Workers' and API's Prometheus metrics, added up at /metrics (prometheus_client's
    # multiprocess mode); a fresh folder each start, as that mode requires.
    if "PROMETHEUS_MULTIPROC_DIR" not in env:  # one of the user's own is theirs to manage
        env["PROMETHEUS_MULTIPROC_DIR"] = str(METRICS_DIR)
        shutil.rmtree(METRICS_DIR, ignore_errors=True)
    Path(env["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True, exist_ok=True)
    embedded = None
    if not os.environ.get("REDIS_URL"):
        embedded = EmbeddedRedis(
            port=settings.embedded_redis_port,
            data_dir=Path("data"),
            maxmemory=settings.embedded_redis_maxmemory,
        )
        embedded.start()
        env["REDIS_URL"] = embedded.url
        logger.info("embedded redis-server on %s (data in data/)", embedded.url)
    bin_dir = Path(sys.executable).parent
    children = [
        ("consumer", start([
            str(bin_dir / "huey_consumer"), "core.huey",
            "-k", settings.worker_type, "-w", str(settings.workers),
        ], env)),
        ("api", start([
            sys.executable, "-m", "uvicorn", "main:app",
            "--host", args.host, "--port", str(args.port),
            "--log-config", "config/logger.config",
        ], env)),
    ]  # fmt: skip
    logger.info("serving on http://%s:%s; Ctrl-C stops everything", args.host, args.port)
    status = 0
    try:
        while not stopping:
            for name, process in children:
                if process.poll() is not None:
                    logger.error("%s exited with %s; stopping the stack", name, process.returncode)
                    stopping, status = True, 1
            time.sleep(0.2)
    finally:
        for name, process in reversed(children):
            stop(process, name)
        if embedded is not None:
            embedded.stop()
        logger.info("stopped")
    return status


if __name__ == "__main__":
    sys.exit(main())
