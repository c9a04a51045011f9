"""Hot reload of the policy file the operator mounts.

Kubernetes updates a mounted ConfigMap by swapping a symlink (`..data`), which inotify on the file itself misses,
so the watcher polls the file's content (a few hundred bytes, read once a second: negligible). A policy that
fails to load is reported and ignored; the router keeps serving with the last good one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

from tiergate_router.config import RouterConfig
from tiergate_router.errors import ConfigError

log = logging.getLogger(__name__)


class PolicyWatcher:
    def __init__(
        self,
        path: Path,
        load: Callable[[Path], RouterConfig],
        apply: Callable[[RouterConfig], None],
        *,
        on_result: Callable[[str], None] | None = None,
        interval_s: float = 1.0,
    ) -> None:
        self.path = path
        self._load = load
        self._apply = apply
        self._on_result = on_result or (lambda _result: None)
        self.interval_s = interval_s
        self._digest: str | None = None
        self.last_error: str | None = None

    def prime(self) -> None:
        """Remember the current content as already applied (the caller loaded it at start-up)."""
        self._digest = self._read_digest()

    def _read_digest(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    def check_once(self) -> bool:
        """Reload if the content changed; True when a new policy was applied."""
        digest = self._read_digest()
        if digest is None or digest == self._digest:
            return False
        self._digest = digest
        try:
            cfg = self._load(self.path)
        except ConfigError as e:
            self.last_error = str(e)
            log.error("policy %s not applied, keeping the previous one: %s", self.path, e)
            self._on_result("error")
            return False
        self._apply(cfg)
        self.last_error = None
        log.info("policy %s reloaded: tiers %s", self.path, ", ".join(cfg.tier_names))
        self._on_result("success")
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.check_once()
