"""`make run`'s secrets: the HMAC secret (HUEYSERVE_SECRET) and the embedded Redis's password,
each created on first start under data/, readable by this user only, and kept across starts.

Safe by default: without them, anyone who can reach Redis could forge jobs and results.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

logger = logging.getLogger(__name__)

SECRET_FILE = "secret"  #: HUEYSERVE_SECRET, shared by the API and the consumer
REDIS_PASSWORD_FILE = "redis-password"  #: the embedded redis-server's `requirepass`


def load_or_create(path: Path) -> str:
    """The token stored at `path`; a new random one (written 0600) when there is none."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:  # somebody made it readable to others: take that back
            logger.warning("%s was readable by other users (%o); now 0600", path, mode)
            path.chmod(0o600)
        token = path.read_text().strip()
        if not token:
            raise ValueError(f"{path} is empty: delete it and a new one is created") from None
        return token
    token = secrets.token_hex(32)
    with os.fdopen(descriptor, "w") as file:
        file.write(token + "\n")
    logger.info("created %s (readable by this user only)", path)
    return token
