"""The report's plain data: what the queries measure and what the gate concludes."""

from __future__ import annotations

from dataclasses import dataclass, field

READY = "ready"
NOT_READY = "not_ready"
INSUFFICIENT = "insufficient_samples"

OTHER_LABEL = "(other)"  # classes beyond the top ones, folded together
NO_LABEL = "(none)"  # a side had no label

TOP_DISAGREEMENTS = 10
INPUT_CHARS = 200  # request bodies in top disagreements are cut to this many characters

# Upper edges (ms) of the latency histogram behind the HTML chart; the last bin is open.
LATENCY_EDGES_MS: tuple[float, ...] = (
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Percentiles:
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None


@dataclass(frozen=True, slots=True)
class Disagreement:
    request_id: str
    ts: float
    input: str | None  # request body, truncated
    primary_label: str | None
    shadow_label: str | None


@dataclass(frozen=True, slots=True)
class HourBucket:
    hour: float  # unix seconds at the start of the UTC hour
    samples: int
    comparable: int
    agreed: int


@dataclass(frozen=True, slots=True)
class Confusion:
    labels: tuple[str, ...] = ()  # most frequent first; then (other), (none) when present
    matrix: tuple[tuple[int, ...], ...] = ()  # rows: primary label, columns: shadow label


@dataclass(frozen=True, slots=True)
class Aggregate:
    """What the records of one (route, shadow) say over the window, before any judgement.

    ``samples`` counts pairs; ``comparable`` those whose agreement is not null (both
    sides answered); ``agreed`` those that agree. Latency percentiles are over the
    responses that arrived on each side (status not null). Score means are over the
    pairs where both sides have a score, so the delta compares like with like.
    ``primary`` is the primary of the most recent pair (a promotion may fall inside the window).
    """

    route: str
    shadow: str
    primary: str | None
    samples: int = 0
    comparable: int = 0
    agreed: int = 0
    primary_latency: Percentiles = field(default_factory=Percentiles)
    shadow_latency: Percentiles = field(default_factory=Percentiles)
    shadow_errors: dict[str, int] = field(default_factory=dict)
    primary_errors: int = 0  # pairs whose primary failed (no status or 5xx)
    scored_pairs: int = 0
    primary_score_mean: float | None = None
    shadow_score_mean: float | None = None
    confusion: Confusion = field(default_factory=Confusion)
    top_disagreements: tuple[Disagreement, ...] = ()
    hourly: tuple[HourBucket, ...] = ()
    primary_histogram: tuple[int, ...] = ()  # counts per LATENCY_EDGES_MS bin (+1 open bin)
    shadow_histogram: tuple[int, ...] = ()

    @property
    def shadow_error_count(self) -> int:
        return sum(self.shadow_errors.values())


@dataclass(frozen=True, slots=True)
class Interval:
    value: float | None
    ci_low: float | None
    ci_high: float | None


@dataclass(frozen=True, slots=True)
class GateCheck:
    name: str
    threshold: float
    value: float | None  # None: not measurable (see ``note``)
    passed: bool
    note: str = ""


@dataclass(frozen=True, slots=True)
class RouteReport:
    aggregate: Aggregate
    agreement: Interval
    latency_ratio_p50: float | None
    latency_ratio_p99: float | None
    shadow_error_rate: float | None
    score_delta: float | None
    gates: tuple[GateCheck, ...]
    decision: str
    recommendation: str


@dataclass(frozen=True, slots=True)
class Report:
    generated_at: float  # unix seconds
    since_seconds: float
    config_path: str
    backend: str
    routes: tuple[RouteReport, ...]
