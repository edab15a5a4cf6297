"""The exception tree. Third-party errors are translated at the boundary.

ShadowProxyError
├── ConfigError          routes.yaml invalid: carries "file:line: key: message"
├── StorageError         a storage backend could not do its job
│   └── StorageUnavailable   the store is unreachable right now (spool and retry)
└── UsageError           bad CLI input (exit code 2)
"""

from __future__ import annotations


class ShadowProxyError(Exception):
    """Base of every error shadowproxy raises on purpose."""


class ConfigError(ShadowProxyError):
    def __init__(
        self, message: str, *, path: str = "", line: int | None = None, key: str = ""
    ) -> None:
        self.path = path
        self.line = line
        self.key = key
        self.message = message
        where = path if line is None else f"{path}:{line}"
        parts = [p for p in (where, key) if p]
        super().__init__(": ".join([*parts, message]))


class StorageError(ShadowProxyError):
    pass


class StorageUnavailable(StorageError):
    pass


class UsageError(ShadowProxyError):
    pass
