"""What the admin listener needs from the running proxy: a tiny Protocol the runtime implements.

``reload`` and ``promote`` are the same operations SIGHUP and the file watcher use, so an
implementation serialises them (one reload at a time) and keeps the old config on error.
"""

from __future__ import annotations

from typing import Any, Protocol


class ControlPlane(Protocol):
    def status(self) -> dict[str, Any]:
        """The ``/admin/status`` document (PRODUCT.md: config, routes, storage)."""
        ...

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Whether to take traffic, and the checks behind the answer."""
        ...

    async def reload(self) -> dict[str, Any]:
        """Re-read routes.yaml; what changed. Raises ConfigError and keeps serving the old one."""
        ...

    async def promote(self, route: str, shadow: str | None) -> dict[str, Any]:
        """Swap primary and shadow in routes.yaml, reload, record the promotion.

        Raises RouteNotFound, ShadowNotFound, ConfigNotWritable (shadowproxy.control.promotion)
        or ConfigError.
        """
        ...
