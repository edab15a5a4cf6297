"""Keep one bad record from poisoning a batch: bisect until the bad ones are isolated."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from shadowproxy.base.errors import StorageError, StorageUnavailable
from shadowproxy.storage.record import Record


class RecordsRejected(StorageError):
    """A batch was stored except ``rejected``: records the store refuses for their content.

    Raised by ``Store.write`` after it stored everything else; the caller counts
    the rejected records as dropped (retrying them can never succeed).
    """

    def __init__(self, rejected: list[tuple[Record, str]], stored: int) -> None:
        self.rejected = rejected
        self.stored = stored
        reasons = "; ".join(reason for _, reason in rejected[:3])
        super().__init__(f"{len(rejected)} record(s) rejected, {stored} stored: {reasons}")


async def write_isolating(
    write: Callable[[Sequence[Record]], Awaitable[None]],
    records: Sequence[Record],
    is_content_error: Callable[[BaseException], bool],
) -> None:
    """``write(records)``; on a content error, split and retry halves down to single records.

    StorageUnavailable (and any error that is not a content error) propagates at
    once: the caller spools the whole batch, and idempotent inserts make the
    halves already stored harmless. Raises RecordsRejected when some were refused.
    """
    rejected: list[tuple[Record, str]] = []

    async def attempt(chunk: Sequence[Record]) -> None:
        try:
            await write(chunk)
        except StorageUnavailable:
            raise
        except Exception as exc:
            if not is_content_error(exc):
                raise
            if len(chunk) == 1:
                rejected.append((chunk[0], f"{type(exc).__name__}: {exc}"[:300]))
                return
            middle = len(chunk) // 2
            await attempt(chunk[:middle])
            await attempt(chunk[middle:])

    if records:
        await attempt(records)
    if rejected:
        raise RecordsRejected(rejected, len(records) - len(rejected))
