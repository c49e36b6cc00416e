"""A frame seen again and again (a replayed folder, a part left in front of the camera) is one entry
on the gallery and the review queue, with its count; one review covers its repeats; reviews in bulk;
the false alarms they make, as a page and as a JSON export."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from hub.db.session import Database
from hub.services.writes import BatchWriter, Envelope
from hub.services import results
from hub.services.results import ResultFilter
from hub.store import ImageStore
from tests.hub.conftest import jpeg

UNREVIEWED = dict(verdict="anomaly", review="unreviewed")


def seed_repeats(db: Database, store: ImageStore, site: str, make_result: Callable[..., object]) -> dict[str, list]:
    """cam-r: one frame flagged four times (scores 0.6 to 0.9) and judged ok once, and two other anomalies."""
    frame = jpeg(77, 60, 60)
    now = time.time()
    same = [make_result(site, "cam-r", seed=i, thumbnail=frame, score=0.6 + i / 10, ts=now - 40 + i)
            for i in range(4)]
    once = make_result(site, "cam-r", seed=50, thumbnail=frame, verdict="ok", score=0.3, crops=0, ts=now - 50)
    others = [make_result(site, "cam-r", seed=60 + i, score=0.75 + i / 100, ts=now - 30 + i) for i in range(2)]
    at = datetime.now(UTC)
    BatchWriter(db, store).write([Envelope(site, "cam-r", r, at) for r in [*same, once, *others]])
    return {"same": same, "others": others}


@pytest.fixture(params=["frame by frame", "within a window"])
def folding(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a page folds repeats: looking up each frame (few frames), or a window of rows (many)."""
    if request.param == "within a window":
        monkeypatch.setattr(results, "MAX_FOLDED_FRAMES", 0)
    return request.param


def test_repeats_fold_into_one_entry_in_either_order_and_across_pages(
        hub_db: Database, store: ImageStore, site: str, make_result, folding: str) -> None:
    made = seed_repeats(hub_db, store, site, make_result)
    same, others = made["same"], made["others"]
    with hub_db.session() as session:
        by_score = results.grouped_results(session, ResultFilter(site=site, sort="score", **UNREVIEWED))
        assert [(g.result.id, g.count) for g in by_score.items] == \
            [(same[3].id, 4), (others[1].id, 1), (others[0].id, 1)]
        first = by_score.items[0]
        assert first.first_ts < first.last_ts and first.last_ts == first.result.ts

        newest = results.grouped_results(session, ResultFilter(site=site, sort="newest", **UNREVIEWED))
        assert [g.result.id for g in newest.items] == [others[1].id, others[0].id, same[3].id]

        # one entry per page: every frame shows up once, on one page only
        seen, before = [], None
        while True:
            page = results.grouped_results(session, ResultFilter(site=site, sort="score", limit=1, before=before,
                                                                 **UNREVIEWED))
            seen += [g.result.id for g in page.items]
            if page.next_before is None:
                break
            before = page.next_before
        assert seen == [same[3].id, others[1].id, others[0].id]

        # the repeats of a frame: every matching result of the same image, the ok one left out by the filter
        ids = results.repeats_of(session, [same[0].id], ResultFilter(site=site, **UNREVIEWED))
        assert ids == sorted(r.id for r in same)
        assert results.repeats_of(session, [others[0].id], ResultFilter(site=site, **UNREVIEWED)) == [others[0].id]


def test_a_window_full_of_repeats_gives_a_short_page_that_links_on_and_no_frame_twice(
        hub_db: Database, store: ImageStore, site: str, make_result, monkeypatch: pytest.MonkeyPatch) -> None:
    made = seed_repeats(hub_db, store, site, make_result)
    same, others = made["same"], made["others"]
    monkeypatch.setattr(results, "MAX_FOLDED_FRAMES", 0)
    monkeypatch.setattr(results, "FOLD_WINDOW", 2)
    pages, before = [], None
    with hub_db.session() as session:
        while True:  # by score: same 0.9, 0.8; others 0.76, 0.75; same 0.7, 0.6 (two rows a window)
            page = results.grouped_results(session, ResultFilter(site=site, sort="score", limit=3, before=before,
                                                                 **UNREVIEWED))
            pages.append([g.result.id for g in page.items])
            if page.next_before is None:
                break
            before = page.next_before
    assert pages == [[same[3].id], [others[1].id, others[0].id], [], []]


def test_a_frame_seen_more_often_than_one_review_covers_says_so(
        client, hub_db, store, site, make_result, monkeypatch: pytest.MonkeyPatch) -> None:
    made = seed_repeats(hub_db, store, site, make_result)
    monkeypatch.setattr(results, "MAX_REPEATS", 3)
    with hub_db.session() as session:
        first = results.grouped_results(session, ResultFilter(site=site, sort="score", **UNREVIEWED)).items[0]
        assert (first.result.id, first.count, first.more) == (made["same"][3].id, 3, True)
        assert abs(first.first_ts.timestamp() - made["same"][0].ts) < 0.01, "the oldest repeat's time, not the 3rd"
        assert results.repeats_of(session, [first.result.id], ResultFilter(site=site, **UNREVIEWED)) == \
            sorted(r.id for r in made["same"])[:3]
    assert "seen 3+×" in client.get(f"/gallery/?site={site}").get_data(as_text=True)
    queue = client.get(f"/review/?site={site}").get_data(as_text=True)
    assert "seen 3+×" in queue and "False alarm (the oldest 3)" in queue


def test_gallery_and_review_show_a_frame_once_with_its_count(client, hub_db, store, site, make_result) -> None:
    made = seed_repeats(hub_db, store, site, make_result)
    gallery = client.get(f"/gallery/?site={site}").get_data(as_text=True)
    assert gallery.count('<article class="defect"') == 3
    link = re.search(r'<a class="repeats" href="([^"]+)"[^>]*>seen 4×</a>', gallery)
    assert link, "the folded frame shows its count, linked to its results"
    every = client.get(link.group(1).replace("&amp;", "&")).get_data(as_text=True)
    assert set(re.findall(r'href="/results/([0-9A-Z]{26})"', every)) == {r.id for r in made["same"]}
    assert "The results of one frame" in every

    queue = client.get(f"/review/?site={site}").get_data(as_text=True)
    assert queue.count('<article class="to-review"') == 3
    assert "False alarm (all 4)" in queue and "seen 4×" in queue


def test_one_review_covers_the_repeats_and_a_selection_is_reviewed_at_once(
        sign_in, hub_db, store, site, make_result) -> None:
    made = seed_repeats(hub_db, store, site, make_result)
    same, others = made["same"], made["others"]
    operator, token = sign_in("operator")
    back = f"/review/?site={site}"
    queue = operator.get(back).get_data(as_text=True)
    scoped = re.search(rf'action="/review/{same[3].id}">(.*?)</form>', queue, re.DOTALL).group(1)
    assert f'<input type="hidden" name="site" value="{site}">' in scoped   # the page's filter travels along
    done = operator.post(f"/review/{same[3].id}", data={"label": "false_alarm", "repeats": "1", "note": "glare",
                                                        "site": site, "csrf_token": token, "next": back})
    assert done.status_code == 302 and done.headers["Location"] == back
    flashed = operator.get(back).get_data(as_text=True)
    assert f"Result {same[3].id} and its repeats marked: false alarm (4 results)." in flashed
    with hub_db.session() as session:
        left = results.grouped_results(session, ResultFilter(site=site, sort="score", **UNREVIEWED))
    assert [g.result.id for g in left.items] == [others[1].id, others[0].id]

    nothing = operator.post("/review/bulk", data={"label": "defect", "csrf_token": token, "next": back})
    assert nothing.status_code == 302 and "Select the entries" in operator.get(back).get_data(as_text=True)
    bulk = operator.post("/review/bulk", data={"label": "defect", "result": [r.id for r in others],
                                               "site": site, "csrf_token": token, "next": back})
    assert bulk.status_code == 302
    assert "2 selected entries marked: defect confirmed (2 results)." in operator.get(back).get_data(as_text=True)
    with hub_db.session() as session:
        assert results.grouped_results(session, ResultFilter(site=site, **UNREVIEWED)).items == []
    viewer, vtoken = sign_in("viewer")
    assert viewer.post("/review/bulk", data={"label": "defect", "result": others[0].id,
                                             "csrf_token": vtoken}).status_code == 403


def test_false_alarms_as_training_data_a_page_with_frames_and_a_json_export(
        sign_in, hub_db, store, site, make_result) -> None:
    made = seed_repeats(hub_db, store, site, make_result)
    operator, token = sign_in("operator")
    operator.post(f"/review/{made['same'][0].id}", data={"label": "false_alarm", "repeats": "1", "site": site,
                                                         "note": "glare on the rim", "csrf_token": token})
    queue = operator.get("/review/").get_data(as_text=True)
    assert 'href="/review/training-data"' in queue

    page = operator.get("/review/training-data").get_data(as_text=True)
    cards = re.findall(r'<article class="defect" data-id="([0-9A-Z]{26})">(.*?)</article>', page, re.DOTALL)
    mine = {rid: body for rid, body in cards if rid in {r.id for r in made["same"]}}
    assert len(mine) == 4
    assert all('<img class="frame" src="/images/' in body and "glare on the rim" in body for body in mine.values())
    export = re.search(r'href="(/review/training-data/export[^"]*)" download>Export as JSON', page)
    assert export

    response = operator.get(export.group(1))
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert response.headers["Content-Disposition"] == 'attachment; filename="training-data-false_alarm.json"'
    body = json.loads(response.get_data(as_text=True))
    exported = {i["result_id"]: i for i in body["items"]}
    assert {r.id for r in made["same"]} <= set(exported) and body["count"] == len(body["items"])
    item = exported[made["same"][0].id]
    assert item["label"] == "false_alarm" and item["note"] == "glare on the rim"
    assert item["image_url"].startswith("/images/") and item["image_api_url"].startswith("/api/images/")

    defects = operator.get("/review/training-data?label=defect").get_data(as_text=True)
    assert "Confirmed defects as training data" in defects
    assert operator.get("/review/training-data?label=maybe").status_code == 400
