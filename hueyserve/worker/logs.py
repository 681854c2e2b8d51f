"""Worker-side logging: what config/logger.config is for uvicorn, for `huey_consumer`.

The stock consumer logs the `huey` logger to the console; this adds `logs/huey.log`, rotated at
midnight with 7 files kept, for every logger, and puts our own loggers on the console as well.
"""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"
OWN_LOGGERS = ("core", "hueyserve")


def configure_worker_logging(log_dir: Path, task_log_level: str | None = None) -> None:
    """Idempotent: safe to call from every worker thread's startup hook. `task_log_level`
    (HUEYSERVE_TASK_LOG_LEVEL) sets the `huey` logger's, whose per-task lines fill the logs
    under load."""
    if task_log_level is not None:
        logging.getLogger("huey").setLevel(task_log_level)
    root = logging.getLogger()
    path = (log_dir / "huey.log").resolve()
    if any(getattr(h, "baseFilename", None) == str(path) for h in root.handlers):
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.TimedRotatingFileHandler(path, when="midnight", backupCount=7)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter(LOG_FORMAT))
    for name in OWN_LOGGERS:
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(console)
