"""`make run`: the whole stack in one terminal, stopped cleanly by Ctrl-C.

Starts Redis (an embedded redis-server with its data, AOF and password under data/, unless
REDIS_URL names a server), one `huey_consumer core.huey` and uvicorn, sharing a secret
(HUEYSERVE_SECRET, else one kept in data/secret); says when the service is ready, and
supervises them: one that exits on its own (killed, out of memory) is started again after
1, 2, 4 ... up to 30 s, counted in `hueyserve_process_restarts_total`, and reported as a crash
loop after 5 exits in a minute, while the other goes on serving. On Ctrl-C or SIGTERM it
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
import urllib.request
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from hueyserve.dev.credentials import REDIS_PASSWORD_FILE, SECRET_FILE, load_or_create
from hueyserve.dev.redis_server import EmbeddedRedis

DATA_DIR = Path("data")
METRICS_DIR = DATA_DIR / "metrics"
#: uvicorn's protocol with a bound on slow request headers (hueyserve.api.protocol)
PROTOCOL = "hueyserve.api.protocol:TimedHttpProtocol"

logger = logging.getLogger("hueyserve.dev.stack")
STOP_TIMEOUT_S = 30.0
RESTART_MAX_S = 30  #: longest wait before restarting a process that exited
CRASH_WINDOW_S = 60  #: exits within this long count toward a crash loop
CRASH_LOOP_EXITS = 5  #: this many exits within the window: reported as a crash loop


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

    # Safe by default: what the API and the consumer read from Redis is signed with a secret,
    # and the embedded Redis wants a password; both are created once under data/. The secret
    # goes into our own environment before settings are read: they refuse a remote Redis
    # without one.
    if not secret_given():
        os.environ["HUEYSERVE_SECRET"] = load_or_create(DATA_DIR / SECRET_FILE)
        logger.info("HUEYSERVE_SECRET from %s", DATA_DIR / SECRET_FILE)
    from hueyserve.settings import settings

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
            data_dir=DATA_DIR,
            maxmemory=settings.embedded_redis_maxmemory,
            password=load_or_create(DATA_DIR / REDIS_PASSWORD_FILE),
        )
        embedded.start()
        env["REDIS_URL"] = embedded.url
        logger.info(
            "embedded redis-server on %s (data in %s/, password in %s)",
            embedded.address, DATA_DIR, DATA_DIR / REDIS_PASSWORD_FILE,
        )  # fmt: skip
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = env["PROMETHEUS_MULTIPROC_DIR"]
    from prometheus_client import multiprocess  # after the line above: multiprocess mode

    from hueyserve.metrics import PROCESS_RESTARTS

    bin_dir = Path(sys.executable).parent
    children = [
        Child("consumer", [
            str(bin_dir / "huey_consumer"), "core.huey",
            "-k", settings.worker_type, "-w", str(settings.workers),
        ], env),
        Child("api", [
            sys.executable, "-m", "uvicorn", "main:app", "--http", PROTOCOL,
            "--host", args.host, "--port", str(args.port),
            "--log-config", "config/logger.config",
        ], env),
    ]  # fmt: skip
    url = f"http://{args.host}:{args.port}"
    logger.info("starting on %s; Ctrl-C stops everything", url)
    ready, status = False, 0
    try:
        while not stopping:
            for child in children:
                exited = child.process
                if child.supervise(time.monotonic()):
                    PROCESS_RESTARTS.labels(child.name).inc()
                if exited is not None and child.process is None:  # its gauges end with it
                    multiprocess.mark_process_dead(exited.pid)  # type: ignore[no-untyped-call]
                if not ready and len(child.exits) >= CRASH_LOOP_EXITS:
                    logger.error("%s never came up; stopping (see the errors above)", child.name)
                    stopping, status = True, 1
            if not ready and _ready(url):
                ready = True
                logger.info("ready: %s (docs at %s/docs)", url, url)
            time.sleep(0.2)
    finally:
        for child in reversed(children):
            if child.process is not None:
                stop(child.process, child.name)
        if embedded is not None:
            embedded.stop()
        logger.info("stopped")
    return status


class Child:
    """One supervised process: started at once, started again with a growing delay when it
    exits on its own (a killed consumer must not take the API down with it)."""

    def __init__(self, name: str, command: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.command = command
        self.env = env
        self.process: subprocess.Popen[bytes] | None = start(command, env)
        self.exits: list[float] = []  # when it exited on its own, within CRASH_WINDOW_S
        self.restart_at: float | None = None

    def supervise(self, now: float) -> bool:
        """Notice an exit and schedule a restart, or restart when due; True on a restart."""
        if self.process is not None and self.process.poll() is not None:
            self.exits = [t for t in self.exits if now - t < CRASH_WINDOW_S] + [now]
            delay = min(RESTART_MAX_S, 2 ** (len(self.exits) - 1))
            logger.error(
                "%s (pid %s) exited with %s; restarting it in %ss",
                self.name, self.process.pid, self.process.returncode, delay,
            )  # fmt: skip
            if len(self.exits) >= CRASH_LOOP_EXITS:
                logger.error(
                    "%s is in a crash loop: %d exits in %ds; see its log above and logs/",
                    self.name, len(self.exits), CRASH_WINDOW_S,
                )  # fmt: skip
            self.process, self.restart_at = None, now + delay
        if self.process is None and self.restart_at is not None and now >= self.restart_at:
            self.process, self.restart_at = start(self.command, self.env), None
            return True
        return False


def secret_given() -> bool:
    """Whether the operator set HUEYSERVE_SECRET (in the environment or `.env`)."""

    class Given(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="HUEYSERVE_", env_file=".env", extra="ignore")
        secret: str = ""

    return bool(Given().secret)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as answer:
            return bool(answer.status == 200)
    except OSError:  # refused, not ready (503) or slow: look again later
        return False


if __name__ == "__main__":
    sys.exit(main())
