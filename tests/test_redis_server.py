"""The embedded redis-server of `make run`: loopback only, and data that survives a restart."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from hueyserve.dev.redis_server import EmbeddedRedis


def test_embedded_redis_keeps_data_across_restart(tmp_path: Path) -> None:
    server = EmbeddedRedis(data_dir=tmp_path / "data")
    assert "127.0.0.1" in server.command() and "everysec" in server.command()
    with server:
        conn = redis.Redis(port=server.port)
        conn.zadd("queue", {"job": 1})
        assert conn.config_get("appendonly") == {"appendonly": "yes"}
        conn.close()
    with EmbeddedRedis(port=server.port, data_dir=tmp_path / "data") as restarted:
        conn = redis.Redis(port=restarted.port)
        assert conn.zrange("queue", 0, -1) == [b"job"]
        conn.close()
    assert server.process is not None and server.process.poll() is not None


def test_embedded_redis_refuses_a_taken_port(tmp_path: Path) -> None:
    with EmbeddedRedis() as first:
        with pytest.raises(RuntimeError, match="already in use"):
            EmbeddedRedis(port=first.port).start()


def test_ctrl_c_at_the_terminal_does_not_reach_the_embedded_redis() -> None:
    """Issue 11.9: a terminal sends Ctrl-C to its whole foreground process group; Redis must
    outlive it until `make run` has stopped the API and the consumer, then stop last."""
    with EmbeddedRedis() as server:
        assert server.process is not None
        assert os.getpgid(server.process.pid) != os.getpgid(0)


def test_a_full_embedded_redis_refuses_writes_rather_than_evict() -> None:
    """Issue 11.13: `make run`'s Redis had no memory limit and grew with traffic."""
    with EmbeddedRedis(maxmemory="64mb") as server:
        conn = redis.Redis(port=server.port)
        assert conn.config_get("maxmemory") == {"maxmemory": str(64 << 20)}
        assert conn.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        conn.close()


def test_a_password_is_asked_of_every_client_and_never_on_the_command_line() -> None:
    """Issue 11.1: `make run`'s Redis let anyone on the machine write to the queue."""
    with EmbeddedRedis(password="pw-123") as server:
        assert server.process is not None
        assert b"pw-123" not in Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
        anonymous = redis.Redis(port=server.port)
        with pytest.raises(redis.AuthenticationError):
            anonymous.set("x", 1)
        anonymous.close()
        conn = redis.Redis.from_url(server.url)
        assert conn.set("x", 1) and "pw-123" not in server.address
        conn.close()
    with pytest.raises(ValueError, match="letters, digits"):
        EmbeddedRedis(password='a" b')
