"""Chart aggregates counted in SQL, and the SVG they are drawn as."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from hub.db.session import Database
from hub.services.writes import BatchWriter, Envelope
from hub.services import charts
from hub.store import ImageStore
from hub.web.svg import Line, histogram, line_chart


def _write(db: Database, store: ImageStore, results, site: str) -> None:
    now = datetime.now(UTC)
    BatchWriter(db, store).write([Envelope(site, r.device, r, now) for r in results])


def test_rates_histograms_and_drift(hub_db: Database, store: ImageStore, unique: str, make_result) -> None:
    site = f"chart-{unique}"
    now = time.time()
    made = []
    # the previous day: widget scores around 0.2; the last hour: around 0.6 (a shift)
    for i in range(40):
        made.append(make_result(site, "cam-c", seed=i, crops=0, station="press", cls=f"widget-{unique}",
                                score=0.18 + (i % 5) * 0.01, verdict="ok", threshold=0.5,
                                ts=now - 86400 - 600 - i))  # fmt: skip
    for i in range(20):
        anomalous = i % 4 == 0
        made.append(make_result(site, "cam-c", seed=100 + i, crops=0, station="press",
                                cls=f"widget-{unique}", score=0.58 + (i % 5) * 0.01,
                                verdict="anomaly" if anomalous else "ok", threshold=0.5,
                                ts=now - 60 - i))  # fmt: skip
    made.append(make_result(site, "cam-d", seed=999, crops=0, station="lathe", cls=f"widget-{unique}",
                            score=0.3, verdict="ok", threshold=0.5, ts=now - 30))  # fmt: skip
    _write(hub_db, store, made, site)

    with hub_db.session() as session:
        day = charts.window("24h")
        rate = charts.anomaly_rate(session, day, site=site)
        by_station = {s.station: s for s in rate.series}
        assert by_station["press"].results == 20 and by_station["press"].anomalies == 5
        assert by_station["lathe"].results == 1 and rate.series[0].station == "press"
        assert all(p.rate <= 1 for s in rate.series for p in s.points)

        (hist,) = [h for h in charts.score_histograms(session, day, site=site) if h.cls.endswith(unique)]
        assert sum(hist.anomaly) == 5 and sum(hist.ok) == 16 and hist.threshold == 0.5
        assert hist.lo <= 0.3 and hist.hi >= 0.62

        (d,) = [d for d in charts.drift(session, charts.window("24h"), site=site) if d.cls.endswith(unique)]
        assert sum(d.current) == 21 and sum(d.reference) == 40 and not d.pinned
        assert d.psi > charts.PSI_SHIFTED and d.state == "shift" and d.ks > 0.9
        assert d.reference_mean < 0.25 < d.current_mean

        # pin the reference to the last hour itself: no drift
        hour = charts.window("1h")
        charts.set_reference(session, f"widget-{unique}", hour.start - timedelta(seconds=5), hour.end)
        (same,) = [d for d in charts.drift(session, hour, site=site) if d.cls.endswith(unique)]
        assert same.pinned and same.psi < charts.PSI_STABLE and same.state == "stable"
        session.rollback()


def test_svg_is_escaped_and_self_contained() -> None:
    start = datetime(2025, 1, 1, tzinfo=UTC)
    svg = line_chart(
        [Line("<script>alert(1)</script>", [(start + timedelta(hours=h), 0.1 * h, "x") for h in range(3)])],
        start,
        start + timedelta(hours=3),
        y_label="rate & more",
        percent=True,
    )
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "rate &amp; more" in svg
    assert svg.startswith("<svg") and "http" not in svg  # inline in HTML: no namespace URL needed
    assert "style=" not in svg  # the Content-Security-Policy forbids inline styles
    bars = histogram(0.0, 0.1, [1, 2, 0], [0, 1, 3], 0.15, label="h")
    assert bars.count('class="bar ok"') == 2 and bars.count('class="bar anomaly"') == 2
    assert 'class="threshold"' in bars


def test_the_window_fits_the_data_there_is_and_a_station_keeps_its_colour(
        hub_db: Database, store: ImageStore, unique: str, make_result) -> None:
    from hub.web.svg import ANOMALY_COLOUR, PALETTE

    site, old_site = f"fresh-{unique}", f"idle-{unique}"
    now = time.time()
    # a site that started four minutes ago, three stations; another whose last result is three days old
    made = [make_result(site, "cam-f", seed=i, crops=0, station=f"st-{i % 3}", verdict="ok", score=0.2,
                        ts=now - 240 + i * 10) for i in range(24)]
    _write(hub_db, store, made, site)
    _write(hub_db, store, [make_result(old_site, "cam-o", seed=99, crops=0, verdict="ok", score=0.2,
                                       ts=now - 3 * 86400)], old_site)

    with hub_db.session() as session:
        w = charts.data_window(session, site=site)
        assert w.name == "15m" and charts.data_window(session, site=site, device="cam-f").name == "15m"
        assert charts.data_window(session, site=old_site).name == "7d"
        assert charts.data_window(session, site=f"none-{unique}").name == charts.DEFAULT_WINDOW
        rate = charts.anomaly_rate(session, w, site=site)
        assert len(rate.series) == 3 and all(len(s.points) >= 4 for s in rate.series), "lines, not lone dots"
        ranks = {s.station: s.rank for s in rate.series}
        assert len(set(ranks.values())) == 3
        for name in ("1h", "24h", "7d"):   # the busiest station first or not, each keeps its place
            assert {s.station: s.rank for s in charts.anomaly_rate(session, charts.window(name), site=site).series} \
                == ranks
    assert ANOMALY_COLOUR not in PALETTE   # red says "anomaly", never "a station"
    assert len({Line(st, [], rank).colour for st, rank in ranks.items()}) == 3
