"""The dashboard's pages in Chromium, measured: every image keeps its own aspect ratio, crops are
readable, a station keeps its colour across windows (and red stays the anomalies'), a model's page is
reached from the Models list, a repeated frame is one entry reviewed in bulk, false alarms are a page
with an export, Live shows heat maps, and a drift card without a reference says so."""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from pathlib import Path

import cv2
import numpy as np

from hub.services import registry
from shared.imaging import encode_jpeg, encode_png
from tests.e2e.conftest import ARTIFACTS, Hub, result, sign_in

LOADED = "() => [...document.images].every((i) => i.complete && i.naturalWidth > 0)"
MEASURE = """() => [...document.querySelectorAll('main img')].filter((i) => i.naturalWidth).map((i) => {
  const r = i.getBoundingClientRect();
  return {cls: i.className, alt: i.alt, fit: getComputedStyle(i).objectFit, w: r.width, h: r.height,
          x: r.x, y: r.y, natural: i.naturalWidth / i.naturalHeight};
})"""


def square(hub: Hub, device: str, seed: int, *, station: str = "line-sq", frame: np.ndarray | None = None,
           verdict: str = "anomaly", cls: str = "bottle") -> object:
    """A result whose frame and heat map are square and whose crops are tall, as a 1:1 camera makes them."""
    rng = np.random.default_rng(seed)
    if frame is None:
        frame = np.full((96, 96, 3), 120, np.uint8)
        frame[20:76, 30:66] = rng.integers(40, 200, 3)
    heat = cv2.applyColorMap(cv2.GaussianBlur(frame[..., 0], (0, 0), 5), cv2.COLORMAP_JET)[..., ::-1].copy()
    base = result(hub.site, device, seed, verdict=verdict, score=0.7 + seed % 10 / 100, station=station, cls=cls)
    crops = tuple(dataclasses.replace(c, w=20, h=50, jpeg=encode_jpeg(frame[10:60, 20 + 10 * i:40 + 10 * i]))
                  for i, c in enumerate(base.crops))
    return dataclasses.replace(base, thumbnail=encode_jpeg(frame), heatmap=encode_png(heat), crops=crops)


def wait_stored(hub: Hub, count: int) -> None:
    import time

    deadline = time.monotonic() + 15
    while hub.ingest.stats().stored < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hub.ingest.stats().stored >= count, hub.ingest.stats()


def publish(hub: Hub, *results: object) -> None:
    target = hub.ingest.stats().stored + len(results)
    for r in results:
        hub.publish.send(hub.site, r)
    wait_stored(hub, target)


def assert_aspect_kept(page, where: str) -> list[dict]:
    page.wait_for_function(LOADED)
    shown = page.evaluate(MEASURE)
    assert shown, f"{where}: no image shown"
    for img in shown:
        if img["fit"] in ("contain", "scale-down"):
            continue   # the box may differ; the picture inside keeps its shape
        assert img["fit"] != "cover", f"{where}: {img} is cut to its box"
        ratio = img["w"] / img["h"]
        assert abs(ratio - img["natural"]) / img["natural"] < 0.03, f"{where}: {img} is stretched"
    return shown


def test_every_image_keeps_its_aspect_ratio_and_crops_are_readable(browser, hub: Hub) -> None:
    device = f"cam-sq-{uuid.uuid4().hex[:4]}"
    made = [square(hub, device, 40 + i) for i in range(3)]
    publish(hub, *made)
    context = browser.new_context(viewport={"width": 1400, "height": 2400})
    page = context.new_page()
    sign_in(page, hub, "operator", f"/gallery/?site={hub.site}&device={device}")
    pages = {
        "gallery": f"/gallery/?site={hub.site}&device={device}",
        "result": f"/results/{made[0].id}",
        "device": f"/devices/{hub.site}/{device}",
        "review": f"/review/?site={hub.site}&device={device}",
        "results": f"/results/?site={hub.site}&device={device}",
        "live": f"/live/?site={hub.site}&device={device}",
    }
    for name, path in pages.items():
        page.goto(hub.url + path)
        shown = assert_aspect_kept(page, name)
        bases = [i for i in shown if i["cls"] == "base"]
        heats = [i for i in shown if i["cls"] == "heat"]
        if name in ("gallery", "result", "device", "review"):
            assert bases and len(bases) == len(heats), f"{name}: overlays expected"
            for base, heat in zip(bases, heats, strict=True):
                assert abs(base["w"] / base["h"] - 1.0) < 0.03, f"{name}: the square frame is {base}"
                assert all(abs(base[k] - heat[k]) < 1 for k in ("x", "y", "w", "h")), \
                    f"{name}: the heat map {heat} does not cover its frame {base}"
        if name in ("gallery", "review"):
            crops = [i for i in shown if i["cls"] == "crop"]
            assert crops and all(c["h"] >= 80 for c in crops), f"{name}: crops too small to read: {crops}"
        page.screenshot(path=ARTIFACTS / f"aspect-{name}.png", full_page=True)
    context.close()


def legend_colours(page) -> dict[str, str]:
    items = page.locator("#rate .legend li")
    return {items.nth(i).inner_text().strip(): items.nth(i).locator("rect").get_attribute("fill")
            for i in range(items.count())}


def test_a_station_keeps_its_colour_in_every_window_and_red_is_left_to_anomalies(page, hub: Hub) -> None:
    sign_in(page, hub, "viewer", f"/charts/?site={hub.site}")
    assert page.locator("select[name=window] option[selected]").inner_text() == "8h", \
        "with five hours of results the window shown is the shortest that holds them"
    seen = {}
    for window in ("", "24h", "8h", "7d", "30d"):
        page.goto(hub.url + f"/charts/?site={hub.site}" + (f"&window={window}" if window else ""))
        colours = legend_colours(page)
        assert {"line-1", "line-2"} <= set(colours), colours
        strokes = {page.locator("#rate path.series").nth(i).get_attribute("stroke")
                   for i in range(page.locator("#rate path.series").count())}
        assert strokes <= set(colours.values())
        if window in ("", "8h"):   # in a month, five hours are one point
            assert len(strokes) >= 2, "the stations are drawn as lines"
        for station, colour in colours.items():
            assert colour.lower() != "#c0362c", f"{station} is drawn in the anomaly red"
            assert seen.setdefault(station, colour) == colour, f"{station} changed colour in window {window}"
    page.screenshot(path=ARTIFACTS / "charts-colours.png", full_page=True)


def test_a_model_page_is_reached_from_the_models_list(page, hub: Hub) -> None:
    name = f"bottle-{uuid.uuid4().hex[:6]}"
    with hub.db.transaction() as session:
        metrics = {"image_auroc": 0.95, "pixel_auroc": 0.9, "classes": {"bottle": 0.97, "cap": 0.93}}
        first = registry.register_model(session, {"name": name, "version": "1.4.0", "sha256": "cd" * 32,
                                                  "size_bytes": 2_000_000, "url": "https://models.invalid/a",
                                                  "method": "stfpm", "metrics": metrics}, user_id=None)
        second = registry.register_model(session, {"name": name, "version": "1.5.0", "sha256": "ef" * 32,
                                                   "size_bytes": 2_000_000, "url": "https://models.invalid/b",
                                                   "method": "patchcore", "parent_version": "1.4.0",
                                                   "metrics": metrics}, user_id=None)
    sign_in(page, hub, "viewer", "/models/")
    page.get_by_role("link", name="1.4.0").first.click()
    page.wait_for_url(f"{hub.url}/models/{first.id}")
    assert page.get_by_role("heading", name=f"{name} 1.4.0").count() == 1
    assert "0.970" in page.locator("table.metrics").inner_text()
    page.locator("ol.lineage").get_by_role("link", name="1.5.0").click()
    page.wait_for_url(f"{hub.url}/models/{second.id}")
    assert page.locator("ol.lineage").get_by_role("link", name="1.4.0").count() == 1
    assert "kdfleet hub rollout start" in page.locator("code.command").inner_text()
    page.screenshot(path=ARTIFACTS / "model.png", full_page=True)


def test_a_repeated_frame_is_one_entry_reviewed_in_bulk_then_a_false_alarm_to_export(page, hub: Hub) -> None:
    device = f"cam-rep-{uuid.uuid4().hex[:4]}"
    frame = np.full((96, 96, 3), 150, np.uint8)
    frame[30:60, 30:60] = (30, 30, 30)
    repeats = [square(hub, device, 60 + i, frame=frame) for i in range(5)]
    other = square(hub, device, 70)
    publish(hub, *repeats, other)
    sign_in(page, hub, "operator", f"/review/?site={hub.site}&device={device}")
    entries = page.locator("article.to-review")
    assert entries.count() == 2
    assert "seen 5×" in page.locator("main").inner_text()
    assert page.get_by_role("button", name="False alarm (all 5)").count() == 1
    page.get_by_label("Select every entry on this page").check()
    assert page.locator('input[name="result"]:checked').count() == 2
    page.screenshot(path=ARTIFACTS / "review-repeats.png", full_page=True)
    page.get_by_role("button", name="Selected: false alarm").click()
    page.wait_for_selector("p.notice.ok")
    assert "2 selected entries marked: false alarm (6 results)." in page.locator("p.notice.ok").inner_text()
    assert page.locator("article.to-review").count() == 0

    page.goto(hub.url + "/review/")
    page.get_by_role("link", name="false alarms as training data").click()
    page.wait_for_url(re.compile(r".*/review/training-data$"))
    mine = page.locator("article.defect", has=page.locator(f'a[href="/results/{other.id}"]'))
    assert mine.count() == 1
    page.wait_for_function(LOADED)
    assert mine.locator("img").evaluate("(i) => i.naturalWidth") > 0
    with page.expect_download() as download:
        page.get_by_role("link", name="Export as JSON").click()
    exported = json.loads(Path(download.value.path()).read_text())
    ids = {i["result_id"] for i in exported["items"]}
    assert {r.id for r in [*repeats, other]} <= ids and exported["label"] == "false_alarm"
    page.screenshot(path=ARTIFACTS / "training-data.png", full_page=True)


def test_live_shows_each_new_result_s_heat_map(page, hub: Hub) -> None:
    device = f"cam-live-{uuid.uuid4().hex[:4]}"
    sign_in(page, hub, "viewer", f"/live/?site={hub.site}&device={device}")
    page.wait_for_selector("#live-status.live")
    assert page.locator("#live-table thead th", has_text="Heat map").count() == 1
    fresh = square(hub, device, 80)
    hub.publish.send(hub.site, fresh)
    row = page.locator(f'tr[data-id="{fresh.id}"]')
    row.wait_for()
    heat = row.locator('img[alt^="heat map of"]')
    assert heat.count() == 1
    page.wait_for_function(LOADED)
    assert heat.evaluate("(i) => i.naturalWidth") > 0
    assert "frame-0080.png" in row.inner_text(), "the row names the frame's source"


def test_a_drift_card_without_a_reference_says_so_and_what_its_button_does(page, hub: Hub) -> None:
    cls = f"nut-{uuid.uuid4().hex[:4]}"
    publish(hub, *(square(hub, "cam-1", 90 + i, station="line-1", verdict="ok", cls=cls) for i in range(3)))
    sign_in(page, hub, "admin", f"/charts/?site={hub.site}&window=24h")
    card = page.locator("section.drift-panel", has=page.get_by_role("heading", name=cls))
    assert card.locator(".drift").inner_text() == "no reference yet"
    text = card.locator("p.no-reference").inner_text()
    assert "holds no" in text and "Use this window as the reference" in text and "compared with it" in text
    assert "PSI" not in card.inner_text() and "unknown" not in card.inner_text()
    card.get_by_role("button", name="Use this window as the reference").click()
    page.wait_for_selector("p.notice.ok")
    card = page.locator("section.drift-panel", has=page.get_by_role("heading", name=cls))
    assert card.locator(".drift").inner_text() == "stable"
