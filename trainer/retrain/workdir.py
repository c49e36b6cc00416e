"""The service's work directory: its state and the reviewed images it collected.

collect pages through the hub's /api/training-data for results whose latest
review is `false_alarm` (new normal images of their class) or `defect` (new
test anomalies) and downloads their frames into WORKDIR/inbox; --holdout of
each class's images are kept out of training for the gate. merged_data lays
the base data set and the collected normals out as one MVTec-layout set.

WORKDIR/state.json remembers what was collected (and its split), what was
trained on, the checkpoint of every release and every version built.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from shared.vocabulary import REVIEW_DEFECT, REVIEW_FALSE_ALARM

from trainer.gate import HOLDOUT, assign_split
from trainer.retrain.hub import Hub, ServeError

log = logging.getLogger("kdfleet.trainer.serve")

STATE = "state.json"
LABELS = {REVIEW_FALSE_ALARM: "normal", REVIEW_DEFECT: "defect"}   # review label -> what the image becomes


def load_state(workdir: Path) -> dict[str, Any]:
    """What earlier cycles left: collected images (with their split), what was trained on, the newest review
    seen per label, the checkpoint of each release by version, every version built, a rollout to retry."""
    path = workdir / STATE
    state: dict[str, Any] = {}
    if path.exists():
        try:
            state = json.loads(path.read_text())
        except ValueError as exc:
            raise ServeError(f"{path} is not valid JSON ({exc}); fix it or move it away to start afresh") from None
    for key, empty in (("collected", {}), ("trained", []), ("since", {}), ("releases", {}), ("built", []),
                       ("cycle", 0), ("base_version", None), ("unrolled", None)):
        state.setdefault(key, empty)
    return state


def save_state(workdir: Path, state: dict[str, Any]) -> None:
    tmp = workdir / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    tmp.replace(workdir / STATE)


def safe_name(name: str) -> str:
    """`name` fit for a file name: anything but letters, digits, `_`, `.` and `-` becomes `_`."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def collect(hub: Hub, state: dict[str, Any], workdir: Path, classes: list[str], holdout: float = HOLDOUT) -> int:
    """Download newly reviewed images into WORKDIR/inbox, each given its split (train or holdout) once;
    returns how many arrived."""
    arrived = 0
    for label, role in LABELS.items():
        items = hub.reviewed(label, state["since"].get(label))
        for item in items:
            rid, cls = item["result_id"], item["cls"]
            known = state["collected"].get(rid)
            if known and known["role"] == role:
                continue
            if cls not in classes:
                log.info("skipping result %s: class %r is not one the model knows (%s)", rid, cls, ", ".join(classes))
                continue
            if not item.get("image_api_url"):
                log.info("skipping result %s: the hub kept no image of it (retention)", rid)
                continue
            data, ctype = hub.request("GET", item["image_api_url"])
            if not ctype.startswith("image/"):
                raise ServeError(f"{hub.url}{item['image_api_url']} answered {ctype or 'no type'}, not an "
                                 "image; is this hub older than the trainer (no /api/images/)?")
            suffix = ".png" if "png" in ctype else ".jpg"
            target = workdir / "inbox" / safe_name(cls) / role / f"{safe_name(rid)}{suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            if known:   # re-reviewed: a false alarm later found a defect, or the other way round
                log.info("result %s was re-reviewed: now %s", rid, label)
                Path(known["file"]).unlink(missing_ok=True)
            split = assign_split(state["collected"], cls, role, holdout)
            state["collected"][rid] = {"cls": cls, "role": role, "file": str(target), "score": item.get("score"),
                                       "reviewed_at": item["created_at"], "split": split}
            arrived += 1
        if items:
            state["since"][label] = max(i["created_at"] for i in items)
    return arrived


def merged_data(base: Path, out: Path, classes: list[str], normals: dict[str, list[Path]]) -> Path:
    """An MVTec-layout set at `out`: the base set's classes, with the new normals added to train/good.

    Base images are linked, not copied; test/ and ground_truth/ are the base set's own.
    """
    if out.exists():
        shutil.rmtree(out)
    for cls in classes:
        src, dst = base / cls, out / cls
        (dst / "train").mkdir(parents=True)
        for sub in ("test", "ground_truth"):
            if (src / sub).exists():
                (dst / sub).symlink_to((src / sub).resolve(), target_is_directory=True)
        good = dst / "train" / "good"
        good.mkdir()
        for p in sorted((src / "train" / "good").iterdir()):
            if p.is_file():
                (good / p.name).symlink_to(p.resolve())
        for p in normals.get(cls, []):
            (good / f"hub-{p.name}").symlink_to(p.resolve())
    return out
