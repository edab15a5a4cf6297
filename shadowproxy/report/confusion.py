"""Fold (primary label, shadow label, count) cells into a small square confusion matrix."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from shadowproxy.report.model import NO_LABEL, OTHER_LABEL, Confusion

TOP_CLASSES = 10


def fold_confusion(
    cells: Iterable[tuple[str | None, str | None, int]], top: int = TOP_CLASSES
) -> Confusion:
    """Keep the ``top`` most frequent labels (both sides counted), fold the rest into (other).

    Idempotent: cells already folded by the database fold to the same matrix.
    """
    cell_list = [(p, s, n) for p, s, n in cells if n > 0]
    frequency: Counter[str] = Counter()
    for primary, shadow, count in cell_list:
        for label in (primary, shadow):
            if label is not None and label != OTHER_LABEL:
                frequency[label] += count
    ranked = sorted(frequency.items(), key=lambda item: (-item[1], item[0]))
    kept = [label for label, _ in ranked[:top]]
    kept_set = set(kept)

    def fold(label: str | None) -> str:
        if label is None:
            return NO_LABEL
        return label if label in kept_set else OTHER_LABEL

    folded: Counter[tuple[str, str]] = Counter()
    for primary, shadow, count in cell_list:
        folded[(fold(primary), fold(shadow))] += count
    present = {label for pair in folded for label in pair}
    labels = kept + [extra for extra in (OTHER_LABEL, NO_LABEL) if extra in present]
    matrix = tuple(tuple(folded[(row, col)] for col in labels) for row in labels)
    return Confusion(labels=tuple(labels), matrix=matrix)
