"""The dashboard in a real browser: sign-in, the fleet, the live feed receiving a result
published over MQTT, a review, the gallery's overlays and the charts. Screenshots go to
test-artifacts/."""

from __future__ import annotations

import re

from tests.e2e.conftest import ARTIFACTS, Hub, result, sign_in


def test_sign_in_then_see_the_fleet(page, hub: Hub) -> None:
    page.goto(hub.url + "/results/")
    assert "/login" in page.url
    page.get_by_label("User name").fill(hub.users["viewer"])
    page.get_by_label("Password").fill("wrong password")
    page.get_by_role("button", name="Sign in").click()
    assert page.get_by_role("alert").inner_text().startswith("Wrong user name or password")

    sign_in(page, hub, "viewer", f"/?site={hub.site}")
    online = page.locator("tr.device.online", has_text="cam-1")
    assert "onnxruntime" in online.inner_text() and "1.4.0" in online.inner_text()
    assert page.locator("tr.device.offline", has_text="cam-2").count() == 1
    page.screenshot(path=ARTIFACTS / "fleet.png", full_page=True)
    page.get_by_role("link", name="cam-1").click()
    page.wait_for_url(re.compile(r".*/devices/.*/cam-1$"))
    assert page.locator("svg.chart").count() == 1
    page.screenshot(path=ARTIFACTS / "device.png", full_page=True)


def test_the_live_feed_shows_a_newly_published_result(page, hub: Hub) -> None:
    sign_in(page, hub, "viewer", f"/live/?site={hub.site}")
    page.wait_for_selector("#live-status.live")
    fresh = result(hub.site, "cam-1", 901, verdict="anomaly", score=0.93, station="line-9")
    hub.publish.send(hub.site, fresh)
    row = page.locator(f'tr[data-id="{fresh.id}"]')
    row.wait_for()
    assert "line-9" in row.inner_text() and "0.930" in row.inner_text()
    assert page.locator("#live-table tbody tr").first.get_attribute("data-id") == fresh.id
    page.screenshot(path=ARTIFACTS / "live.png", full_page=True)

    # filtered to ok verdicts, an anomaly does not show up
    page.goto(hub.url + f"/live/?site={hub.site}&verdict=ok")
    page.wait_for_selector("#live-status.live")
    ok, bad = (result(hub.site, "cam-1", 902 + i, verdict=v, score=s)
               for i, (v, s) in enumerate((("ok", 0.21), ("anomaly", 0.8))))  # fmt: skip
    hub.publish.send(hub.site, bad)
    hub.publish.send(hub.site, ok)
    page.locator(f'tr[data-id="{ok.id}"]').wait_for()
    assert page.locator(f'tr[data-id="{bad.id}"]').count() == 0


def test_an_operator_reviews_a_false_alarm(page, hub: Hub) -> None:
    sign_in(page, hub, "operator", f"/review/?site={hub.site}")
    first = page.locator("article.to-review").first
    rid = first.get_attribute("id").removeprefix("r-")
    first.get_by_label("Note").fill("reflection of the lamp on the cap")
    page.screenshot(path=ARTIFACTS / "review.png", full_page=True)
    first.get_by_role("button", name="False alarm").click()
    page.wait_for_selector("p.notice.ok")
    assert f"Result {rid} marked" in page.locator("p.notice.ok").inner_text()
    assert page.locator(f"#r-{rid}").count() == 0

    page.goto(hub.url + f"/results/{rid}")
    reviews = page.get_by_label("Review")
    assert "false alarm" in reviews.inner_text() and "reflection of the lamp" in reviews.inner_text()
    page.screenshot(path=ARTIFACTS / "result.png", full_page=True)
    training = page.request.get(hub.url + "/api/training-data").json()
    assert rid in [i["result_id"] for i in training["items"]]


def test_the_gallery_lays_heat_maps_over_frames(page, hub: Hub) -> None:
    sign_in(page, hub, "viewer", f"/gallery/?site={hub.site}")
    cards = page.locator("article.defect")
    assert cards.count() >= 6
    scores = [float(s) for s in page.locator("article.defect .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    heat = page.locator(".overlay img.heat").first
    heat.wait_for()
    page.wait_for_function("() => [...document.images].every((i) => i.complete && i.naturalWidth > 0)")
    page.locator("input[data-overlay]").fill("90")
    assert heat.evaluate("(img) => getComputedStyle(img).opacity") == "0.9"
    page.screenshot(path=ARTIFACTS / "gallery.png", full_page=True)


def test_the_charts_render(page, hub: Hub) -> None:
    sign_in(page, hub, "viewer", f"/charts/?site={hub.site}&window=24h")
    charts = page.locator("svg.chart")
    assert charts.count() == 1 + 2 + 2  # rate, a histogram and a drift chart per class
    rate = page.locator("#rate svg.chart")
    box = rate.bounding_box()
    assert box is not None and box["width"] > 400 and box["height"] > 100
    assert rate.locator("circle").count() >= 10 and rate.locator("path.series").count() == 2
    assert page.locator("svg.histogram rect.bar.anomaly").count() >= 2
    assert page.locator("svg.histogram line.threshold").count() == 2
    assert page.locator("svg.distributions path.current").count() == 2
    assert "line-1" in page.locator("#rate .legend").inner_text()
    page.screenshot(path=ARTIFACTS / "charts.png", full_page=True)
