"""Wilson interval against the textbook formula; percentile_cont; confusion folding."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shadowproxy.report.confusion import fold_confusion
from shadowproxy.report.stats import percentile_cont, wilson_interval

Z = 1.959963984540054


def reference_wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson (1927): (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    p = k / n
    center = p + Z * Z / (2 * n)
    spread = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    denominator = 1 + Z * Z / n
    return (center - spread) / denominator, (center + spread) / denominator


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        # published values (e.g. Newcombe 1998, Table I, method 3)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_matches_published_values(k: int, n: int, low: float, high: float) -> None:
    assert wilson_interval(k, n) == pytest.approx((low, high), abs=5e-5)


@given(st.integers(1, 100_000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_matches_reference_formula(case: tuple[int, int]) -> None:
    k, n = case
    low, high = wilson_interval(k, n) or (math.nan, math.nan)
    ref_low, ref_high = reference_wilson(k, n)
    assert low == pytest.approx(max(ref_low, 0.0), abs=1e-12)
    assert high == pytest.approx(min(ref_high, 1.0), abs=1e-12)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_wilson_edges() -> None:
    assert wilson_interval(0, 0) is None
    low, high = wilson_interval(0, 50) or (-1, -1)
    assert low == 0.0 and high == pytest.approx(reference_wilson(0, 50)[1])
    low, high = wilson_interval(50, 50) or (-1, -1)
    assert high == 1.0 and low == pytest.approx(reference_wilson(50, 50)[0])
    # 100 of 100 is not proof of 95%: the lower bound stays below it
    assert (wilson_interval(100, 100) or (1, 1))[0] == pytest.approx(0.963, abs=1e-3)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_percentile_cont_interpolates_like_postgresql() -> None:
    assert percentile_cont([], 0.5) is None
    assert percentile_cont([7.0], 0.99) == 7.0
    values = [float(v) for v in range(1, 201)]
    assert percentile_cont(values, 0.5) == pytest.approx(100.5)
    assert percentile_cont(values, 0.9) == pytest.approx(180.1)
    assert percentile_cont(values, 0.99) == pytest.approx(198.01)


def test_confusion_folds_rare_classes() -> None:
    cells = [("a", "a", 50), ("b", "b", 30), ("c", "b", 5), ("d", "a", 2), (None, "a", 1)]
    confusion = fold_confusion(cells, top=2)
    assert confusion.labels == ("a", "b", "(other)", "(none)")
    assert confusion.matrix == (
        (50, 0, 0, 0),
        (0, 30, 0, 0),
        (2, 5, 0, 0),
        (1, 0, 0, 0),
    )
    assert (
        fold_confusion(
            [(p if p is None or p in confusion.labels else "(other)", s, n) for p, s, n in cells],
            top=2,
        ).matrix
        == confusion.matrix
    )  # folding twice changes nothing
