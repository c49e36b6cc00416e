"""The stored results: `prune` applies the retention policy; `export-training` writes the reviewed ones
as a training set in the MVTec AD layout."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hub.commands.common import CliError, common_flags, data_dir_flag, open_db, open_images, settings
from hub.services import retention, reviews
from hub.services.common import QueryError, parse_time
from shared.vocabulary import REVIEW_FALSE_ALARM, REVIEW_LABELS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="apply the retention policy once (reviewed results are never deleted)",
        description="Delete results and images past the limits of the [retention] settings. "
        "Results with a review keep their rows, crops and images.",
    )
    common_flags(p)
    data_dir_flag(p)
    p.add_argument("--results-days", type=int, help="override retention.results_days")
    p.add_argument("--images-days", type=int, help="override retention.images_days")
    p.add_argument("--images-max-gb", type=float, help="override retention.images_max_gb")
    p.add_argument("--dry-run", action="store_true", help="count what would go; delete nothing")
    p.set_defaults(handler=cmd_prune)

    p = sub.add_parser(
        "export-training",
        help="write reviewed results as a training set (false alarms: CLASS/train/good)",
        description="Write the frames of results whose latest review is LABEL into OUT in the "
        "MVTec AD layout (false alarms into CLASS/train/good, confirmed defects into "
        "CLASS/test/reviewed_defect) with a manifest.jsonl; files already there are kept.",
    )
    common_flags(p)
    data_dir_flag(p)
    p.add_argument("out", help="output folder")
    p.add_argument("--label", choices=REVIEW_LABELS, default=REVIEW_FALSE_ALARM)
    p.add_argument("--cls", help="one product class only")
    p.add_argument("--since", help="reviewed at or after this ISO 8601 time")
    p.set_defaults(handler=cmd_export_training)


def cmd_prune(args: argparse.Namespace) -> int:
    cfg = settings(args)
    db = open_db(cfg)
    try:
        report = retention.prune(db, open_images(cfg), cfg.retention_policy(), dry_run=args.dry_run)
    finally:
        db.dispose()
    print(report)
    return 0


def cmd_export_training(args: argparse.Namespace) -> int:
    """Write the frames of results whose latest review is `--label` in the MVTec AD layout."""
    cfg = settings(args)
    label = args.label
    db = open_db(cfg)
    store = open_images(cfg)
    folder = ("train", "good") if label == REVIEW_FALSE_ALARM else ("test", "reviewed_defect")
    root = Path(args.out)
    written = missing = 0
    try:
        since_at = parse_time(args.since, "--since") if args.since else None
        root.mkdir(parents=True, exist_ok=True)
        with db.session() as session, open(root / "manifest.jsonl", "a") as manifest:
            before = None
            while True:
                page = reviews.training_data(
                    session, label=label, cls=args.cls, since=since_at, before=before, limit=500
                )
                for item in page.items:
                    sha = item.frame_sha or item.thumbnail_sha
                    stored = store.get(sha) if sha else None
                    if stored is None:
                        missing += 1
                        continue
                    suffix = ".png" if stored.media_type == "image/png" else ".jpg"
                    target = root / item.cls / folder[0] / folder[1] / f"{item.result_id}{suffix}"
                    if not target.exists():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(stored.data)
                        manifest.write(json.dumps(_manifest_record(item, target.relative_to(root))) + "\n")
                        written += 1
                if page.next_before is None:
                    break
                before = page.next_before
    except QueryError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot write into {root}: {exc}") from None
    finally:
        db.dispose()
    print(
        f"wrote {written} images to {root} ({label}); {missing} reviewed results had no image left"
    )
    return 0


def _manifest_record(item: reviews.ReviewView, file: Path) -> dict[str, Any]:
    """One line of manifest.jsonl: the written file and the review and result it came from."""
    return {
        "file": str(file),
        "result_id": item.result_id,
        "label": item.label,
        "note": item.note,
        "reviewer": item.reviewer,
        "reviewed_at": item.created_at.isoformat(),
        "site": item.site,
        "device": item.device,
        "station": item.station,
        "cls": item.cls,
        "score": item.score,
        "threshold": item.threshold,
        "full_frame": item.frame_sha is not None,
    }
