"""The storage plug point: a store is a few async methods (PostgreSQL, SQLite, JSON Lines)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from shadowproxy.storage.record import Record


@dataclass(frozen=True, slots=True)
class PromotionRecord:
    ts: float  # unix seconds
    route: str
    previous_primary: str
    new_primary: str
    config_sha: str
    instance: str


# Replicas see one file edit within seconds; the same swap again this close is the same event.
PROMOTION_WINDOW_S = 600


class Store(Protocol):
    backend: str  # "postgresql" | "sqlite" | "jsonl"
    # Where records go, for the log: an absolute directory or file, or the database's URL
    # without its password.
    location: str

    async def open(self) -> None:
        """Connect and create or upgrade the schema (safe with several replicas at once)."""

    async def write(self, records: Sequence[Record]) -> None:
        """Store a batch. Idempotent on (request_id, shadow_upstream).

        Raises StorageUnavailable when the store cannot be reached right now.
        """

    async def record_promotion(self, promotion: PromotionRecord) -> bool:
        """Store a promotion unless another replica stored the same one (same route, config
        sha and swap, within PROMOTION_WINDOW_S): every replica reloads the same file edit.
        Returns whether this call stored it."""

    async def delete_older_than(self, cutoff_ts: float, batch_size: int) -> int:
        """Delete up to batch_size records older than cutoff; return how many."""

    async def close(self) -> None: ...
