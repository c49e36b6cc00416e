"""Aggregates for the charts: anomaly rate per station over time, score distributions per
class with the threshold, and score drift against a reference distribution.

Everything is counted in SQL (GROUP BY time bucket or score bin), so a chart
costs one pass over its time window whatever the number of results, and only
counts travel to Python. Drift compares each class's score histogram in the
window shown with its reference: the window an admin pinned on the class, or
else the period of the same length just before. It is summed up by the
population stability index (PSI; below 0.1 stable, above 0.25 a shift worth
acting on) and the Kolmogorov-Smirnov distance of the binned distributions.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Integer, case, cast, func, select
from sqlalchemy.orm import Session

from hub.db.models import Device, ProductClass, Result, Site, Station
from hub.services.common import WINDOWS, NotFound, QueryError, epoch_seconds, now_utc

BINS = 30
PSI_GROUPS = 10  # the PSI compares 10 groups of 3 bins: with fewer results per group it is less noisy
MAX_STATIONS = 8  # lines on the rate chart; the busiest stations are shown
# about 30 points per window, so a station's rate reads as a line in any of them
BUCKET_S = {"15m": 30, "1h": 120, "8h": 900, "24h": 3600, "7d": 6 * 3600, "30d": 86400}
DEFAULT_WINDOW = "24h"
PSI_STABLE, PSI_SHIFTED = 0.1, 0.25
_PRIOR = 0.5  # added to every group's count, so an empty group does not make the PSI infinite


@dataclass(frozen=True, slots=True)
class Window:
    name: str  # a key of WINDOWS
    start: datetime
    end: datetime

    @property
    def length(self) -> timedelta:
        return self.end - self.start


def window(name: str | None, now: datetime | None = None) -> Window:
    """The named time window (default 24h) ending now; raises QueryError for an unknown name."""
    name = name or DEFAULT_WINDOW
    if name not in WINDOWS:
        raise QueryError(f"window must be one of {', '.join(WINDOWS)}, not {name!r}")
    end = now or now_utc()
    return Window(name, end - WINDOWS[name], end)


def data_window(
    session: Session, *, site: str | None = None, device: str | None = None, now: datetime | None = None
) -> Window:
    """The shortest named window that holds the results of the last day (with none, the newest result),
    so a site that started minutes ago shows its minutes, not a few dots at the end of an empty day;
    the default window when there is no result in the longest."""
    end = now or now_utc()
    conds = _site_condition(session, site, device)
    oldest = session.scalar(
        select(func.min(Result.ts)).where(Result.ts >= end - WINDOWS[DEFAULT_WINDOW], Result.ts <= end, *conds)
    )
    if oldest is None:
        oldest = session.scalar(select(func.max(Result.ts)).where(Result.ts <= end, *conds))
    if oldest is None:
        return window(DEFAULT_WINDOW, end)
    span = end - oldest
    name = next((n for n, length in WINDOWS.items() if length >= span), DEFAULT_WINDOW)
    return window(name, end)


@dataclass(frozen=True, slots=True)
class RatePoint:
    start: datetime
    results: int
    anomalies: int

    @property
    def rate(self) -> float:
        return self.anomalies / self.results if self.results else 0.0


@dataclass(frozen=True, slots=True)
class RateSeries:
    station: str  # "site / station" when the chart spans several sites
    points: list[RatePoint]  # one per bucket that has results, in time order
    results: int
    anomalies: int
    rank: int = 0  # the station's place among all stations (by when the hub first heard of it): its colour


@dataclass(frozen=True, slots=True)
class RateChart:
    window: Window
    bucket_s: int
    series: list[RateSeries]
    hidden_stations: int  # quieter stations left off


@dataclass(frozen=True, slots=True)
class Histogram:
    cls: str
    lo: float
    width: float  # of each of the BINS bins
    ok: list[int]
    anomaly: list[int]
    threshold: float | None  # the threshold of the class's newest result in the window

    @property
    def total(self) -> int:
        return sum(self.ok) + sum(self.anomaly)

    @property
    def hi(self) -> float:
        return self.lo + self.width * len(self.ok)


@dataclass(frozen=True, slots=True)
class Drift:
    cls: str
    lo: float
    width: float
    reference: list[int]
    current: list[int]
    reference_window: tuple[datetime, datetime]
    pinned: bool  # the reference window was chosen by an admin
    psi: float | None  # None when either side has no results
    ks: float | None
    reference_mean: float | None
    current_mean: float | None

    @property
    def state(self) -> str:
        """stable, watch, shift; "unknown" while the reference holds no result (nothing to compare with)."""
        if self.psi is None:
            return "unknown"
        return "stable" if self.psi < PSI_STABLE else "shift" if self.psi > PSI_SHIFTED else "watch"


def _site_condition(session: Session, site: str | None, device: str | None = None) -> list[Any]:
    """Results of one site (and one device of it), as a device-id condition."""
    if not site:
        return []
    stmt = select(Device.id).join(Device.site).where(Site.name == site)
    if device:
        stmt = stmt.where(Device.name == device)
    ids = list(session.scalars(stmt))
    return [Result.device_id.in_(ids or [-1])]


def anomaly_rate(
    session: Session, w: Window, *, site: str | None = None, device: str | None = None
) -> RateChart:
    """Results and anomalies per station per time bucket over window `w`."""
    bucket_s = BUCKET_S[w.name]
    bucket = epoch_seconds(session, Result.ts) // bucket_s
    rows = session.execute(
        select(
            Result.station_id,
            bucket,
            func.count(),
            func.count().filter(Result.verdict == "anomaly"),
        )
        .where(Result.ts >= w.start, Result.ts < w.end, *_site_condition(session, site, device))
        .group_by(Result.station_id, bucket)
    ).all()
    by_station: dict[int, list[RatePoint]] = defaultdict(list)
    for station_id, b, total, anomalies in rows:
        start = datetime.fromtimestamp(int(b) * bucket_s, UTC)
        by_station[station_id].append(RatePoint(start, total, anomalies))
    names = {
        i: (s, n)
        for i, s, n in session.execute(
            select(Station.id, Site.name, Station.name)
            .join(Station.site)
            .where(Station.id.in_(list(by_station) or [-1]))
        )
    }
    # a station keeps its place (and so its colour) whatever the window, site or device shown
    ranks = {sid: n for n, sid in enumerate(session.scalars(select(Station.id).order_by(Station.id)))}
    several_sites = len({s for s, _ in names.values()}) > 1
    series = [
        RateSeries(
            f"{names[sid][0]} / {names[sid][1]}" if several_sites else names[sid][1],
            sorted(points, key=lambda p: p.start),
            sum(p.results for p in points),
            sum(p.anomalies for p in points),
            ranks.get(sid, 0),
        )
        for sid, points in by_station.items()
    ]
    series.sort(key=lambda s: (-s.results, s.station))
    return RateChart(w, bucket_s, series[:MAX_STATIONS], max(0, len(series) - MAX_STATIONS))


# -- score histograms -----------------------------------------------------------------


def _ranges(
    session: Session, conds: list[Any]
) -> dict[int, tuple[str, float, float, float | None]]:
    """class id -> (name, lowest score, highest score, newest threshold) over `conds`."""
    stats = session.execute(
        select(
            Result.class_id,
            func.min(Result.score),
            func.max(Result.score),
            func.max(Result.id),
        )
        .where(*conds)
        .group_by(Result.class_id)
    ).all()
    if not stats:
        return {}
    thresholds = dict(
        session.execute(
            select(Result.id, Result.threshold).where(Result.id.in_([s[3] for s in stats]))
        ).all()
    )
    names = dict(
        session.execute(
            select(ProductClass.id, ProductClass.name).where(
                ProductClass.id.in_([s[0] for s in stats])
            )
        ).all()
    )
    return {cid: (names[cid], lo, hi, thresholds.get(newest)) for cid, lo, hi, newest in stats}


def _bin_edges(lo: float, hi: float, threshold: float | None) -> tuple[float, float]:
    """(lowest edge, bin width) covering lo..hi and the threshold, with a little margin."""
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    span = hi - lo
    if span <= 0:
        span = abs(hi) * 0.1 or 1.0
        lo -= span / 2
    pad = span * 0.02
    return lo - pad, (span + 2 * pad) / BINS


def _bin_counts(
    session: Session, conds: list[Any], edges: dict[int, tuple[float, float]], by_verdict: bool
) -> dict[tuple[int, str], list[int]]:
    """(class id, verdict or "") -> BINS counts, binned with each class's (lo, width)."""
    if not edges:
        return {}
    offset = case(
        *[(Result.class_id == cid, (Result.score - lo) / width) for cid, (lo, width) in edges.items()],
        else_=-1.0,
    )
    bin_ = cast(offset, Integer)  # truncates; scores are never below lo
    verdict = Result.verdict if by_verdict else None
    columns = [Result.class_id, bin_, func.count()] + ([verdict] if by_verdict else [])
    group = [Result.class_id, bin_] + ([verdict] if by_verdict else [])
    rows = session.execute(
        select(*columns).where(*conds, Result.class_id.in_(list(edges))).group_by(*group)
    )
    out: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0] * BINS)
    for row in rows:
        cid, b, n = row[0], int(row[1]), row[2]
        key = (cid, row[3] if by_verdict else "")
        out[key][min(max(b, 0), BINS - 1)] += n
    return out


def score_histograms(session: Session, w: Window, *, site: str | None = None) -> list[Histogram]:
    """Per class: raw-score histogram over `w`, ok and anomaly counted apart, and the threshold."""
    conds = [Result.ts >= w.start, Result.ts < w.end, *_site_condition(session, site)]
    ranges = _ranges(session, conds)
    edges = {cid: _bin_edges(lo, hi, t) for cid, (_, lo, hi, t) in ranges.items()}
    counts = _bin_counts(session, conds, edges, by_verdict=True)
    out = [
        Histogram(
            cls=name,
            lo=edges[cid][0],
            width=edges[cid][1],
            ok=counts.get((cid, "ok"), [0] * BINS),
            anomaly=counts.get((cid, "anomaly"), [0] * BINS),
            threshold=t,
        )
        for cid, (name, _, _, t) in ranges.items()
    ]
    return sorted(out, key=lambda h: h.cls)


# -- drift ----------------------------------------------------------------------------


def _psi(reference: list[int], current: list[int]) -> float | None:
    """Population stability index over PSI_GROUPS groups of adjacent bins."""
    if not sum(reference) or not sum(current):
        return None
    size = len(reference) // PSI_GROUPS
    ref = [sum(reference[i : i + size]) + _PRIOR for i in range(0, len(reference), size)]
    cur = [sum(current[i : i + size]) + _PRIOR for i in range(0, len(current), size)]
    nr, nc = sum(ref), sum(cur)
    return sum((c / nc - r / nr) * math.log((c / nc) / (r / nr)) for r, c in zip(ref, cur, strict=True))


def _ks(reference: list[int], current: list[int]) -> float | None:
    nr, nc = sum(reference), sum(current)
    if not nr or not nc:
        return None
    cr = cc = 0
    worst = 0.0
    for r, c in zip(reference, current, strict=True):
        cr, cc = cr + r, cc + c
        worst = max(worst, abs(cr / nr - cc / nc))
    return worst


def _mean(lo: float, width: float, counts: list[int]) -> float | None:
    n = sum(counts)
    if not n:
        return None
    return sum((lo + (i + 0.5) * width) * k for i, k in enumerate(counts)) / n


def drift(session: Session, w: Window, *, site: str | None = None) -> list[Drift]:
    """Per class seen in `w`: its score distribution against the class's reference.

    Classes without a pinned reference share one (the period before `w`), so they are
    counted together: a handful of queries whatever the number of classes.
    """
    site_conds = _site_condition(session, site)
    current = [Result.ts >= w.start, Result.ts < w.end, *site_conds]
    seen = _ranges(session, current)
    if not seen:
        return []
    pins = {
        c.id: (c.reference_start, c.reference_end)
        for c in session.scalars(select(ProductClass).where(ProductClass.id.in_(list(seen))))
        if c.reference_start is not None and c.reference_end is not None
    }
    preceding = (w.start - w.length, w.start)
    windows: dict[tuple[datetime, datetime], list[int]] = defaultdict(list)
    for cid in seen:
        windows[pins.get(cid, preceding)].append(cid)

    def reference_conds(span: tuple[datetime, datetime], cids: list[int]) -> list[Any]:
        return [Result.ts >= span[0], Result.ts < span[1], Result.class_id.in_(cids), *site_conds]

    # the bins cover both distributions of a class
    edges: dict[int, tuple[float, float]] = {}
    ref_ranges: dict[int, tuple[str, float, float, float | None]] = {}
    for span, cids in windows.items():
        ref_ranges.update(_ranges(session, reference_conds(span, cids)))
    for cid, (_, lo, hi, _) in seen.items():
        if cid in ref_ranges:
            lo, hi = min(lo, ref_ranges[cid][1]), max(hi, ref_ranges[cid][2])
        edges[cid] = _bin_edges(lo, hi, None)
    cur = _bin_counts(session, current, edges, by_verdict=False)
    ref: dict[tuple[int, str], list[int]] = {}
    for span, cids in windows.items():
        subset = {cid: edges[cid] for cid in cids}
        ref.update(_bin_counts(session, reference_conds(span, cids), subset, by_verdict=False))
    out = []
    for cid, (name, _, _, _) in seen.items():
        start, width = edges[cid]
        r, c = ref.get((cid, ""), [0] * BINS), cur.get((cid, ""), [0] * BINS)
        out.append(
            Drift(
                cls=name,
                lo=start,
                width=width,
                reference=r,
                current=c,
                reference_window=pins.get(cid, preceding),
                pinned=cid in pins,
                psi=_psi(r, c),
                ks=_ks(r, c),
                reference_mean=_mean(start, width, r),
                current_mean=_mean(start, width, c),
            )
        )
    return sorted(out, key=lambda d: d.cls)


def set_reference(
    session: Session, cls: str, start: datetime | None, end: datetime | None
) -> None:
    """Pin (or, with None, unpin) the drift reference window of a class; the caller commits."""
    row = session.scalar(select(ProductClass).where(ProductClass.name == cls))
    if row is None:
        raise NotFound(f"no product class {cls!r}")
    if (start is None) != (end is None) or (start is not None and end is not None and start >= end):
        raise QueryError("a reference window needs a start before its end")
    row.reference_start, row.reference_end = start, end
