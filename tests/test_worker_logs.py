"""Workers' logs: `logs/huey.log`, and a setting for Huey's per-task lines (issue 11.21: they
grew `logs/` by 15.6 MiB in 5 minutes of moderate load, with no setting to lower them)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from hueyserve.worker.logs import configure_worker_logging


def test_the_task_log_level_quiets_huey_s_per_task_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    huey = logging.getLogger("huey")
    root = logging.getLogger()
    monkeypatch.setattr(huey, "level", huey.level)  # put back after the test
    monkeypatch.setattr(root, "level", root.level)
    before = list(root.handlers)
    try:
        configure_worker_logging(tmp_path, None)
        assert huey.isEnabledFor(logging.INFO)  # unset: the consumer's own level stands
        configure_worker_logging(tmp_path, "WARNING")
        huey.info("Executing core.predict: a task")
        huey.warning("a warning still gets through")
        for handler in root.handlers:
            handler.flush()
        written = (tmp_path / "huey.log").read_text()
        assert "a warning still gets through" in written and "Executing" not in written
    finally:
        for handler in set(root.handlers) - set(before):
            root.removeHandler(handler)
            handler.close()
