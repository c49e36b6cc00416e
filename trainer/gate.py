"""The retraining gate: a candidate ships only if it is no worse than the model the fleet runs,
judged on images the candidate was not fine-tuned on, at the thresholds each model ships with.

Reviewed images are split once, as they arrive: `holdout` of each class's false alarms (and of its
confirmed defects) never enter training, so the gate measures what the line will see instead of
what the candidate memorised. Per class, on the base test set plus the held-out reviewed images:

- image AUROC may not drop by more than `max_regression`;
- recall (defects scored above the class threshold) may not drop by more than `max_recall_drop`;
- the false-alarm rate on the test set's good images may not rise by more than `max_false_alarm_rise`;
- the held-out false alarms above the threshold may not grow in number,

and over all classes the candidate must flag fewer held-out false alarms than the current model
(or, when the current model flags none, score them lower on average). The figures of the images
the candidate was trained on are reported too, never gated on.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

SPLITS = ("train", "holdout")
HOLDOUT = 0.3  # share of each class's reviewed images the gate keeps for itself


@dataclass(frozen=True)
class Limits:
    """How much worse than the fleet's model a candidate may be, per class."""

    max_regression: float = 0.01        # image AUROC: one misranked pair in ~100
    max_recall_drop: float = 0.02       # defects caught at the threshold: 2 points
    max_false_alarm_rise: float = 0.02  # good test images flagged at the threshold: 2 points


def assign_split(collected: Mapping[str, Mapping[str, Any]], cls: str, role: str, holdout: float) -> str:
    """The split of the next reviewed image of (`cls`, `role`), keeping the held-out share of those
    collected so far at `holdout` (the second image of a kind is the first held out at 0.3)."""
    same = [c for c in collected.values() if c["cls"] == cls and c["role"] == role]
    held = sum(c.get("split") == "holdout" for c in same)
    return "holdout" if held < int(holdout * (len(same) + 1) + 0.5) else "train"


def figures(m: Mapping[str, Any]) -> dict[str, Any]:
    """One model's figures for one class: `m` holds the test set's raw `scores` and `labels`, the class
    `calibration` (its `threshold`, raw) and the reviewed images' raw scores in `hub[role][split]`."""
    from shared.metrics import auroc

    thr = float(m["calibration"]["threshold"])
    scores, labels = np.asarray(m["scores"], float), np.asarray(m["labels"], int)
    hub = m["hub"]
    held_defects = np.asarray(hub["defect"]["holdout"], float)
    held_normals = np.asarray(hub["normal"]["holdout"], float)
    trained_normals = np.asarray(hub["normal"]["train"], float)
    all_scores = np.r_[scores, held_defects]
    all_labels = np.r_[labels, np.ones(len(held_defects), int)]
    defects = np.r_[scores[labels == 1], held_defects]
    good = scores[labels == 0]
    return {
        "threshold": thr,
        "auroc": float(auroc(all_scores, all_labels)) if 0 < all_labels.sum() < len(all_labels) else math.nan,
        "recall": _share(defects > thr),
        "defects": len(defects),
        "false_alarm_rate_test": _share(good > thr),
        "good_test": len(good),
        "held_out_false_alarms": len(held_normals),
        "held_out_false_alarms_flagged": int((held_normals > thr).sum()),
        "held_out_false_alarm_rate": _share(held_normals > thr),
        "held_out_false_alarm_mean": _normalised_mean(held_normals, m["calibration"]),
        "held_out_defects": len(held_defects),
        "held_out_recall": _share(held_defects > thr),
        "trained_false_alarms": len(trained_normals),
        "trained_false_alarms_flagged": int((trained_normals > thr).sum()),
    }


def _share(flags: np.ndarray) -> float:
    return float(flags.mean()) if len(flags) else math.nan


def _normalised_mean(raw: np.ndarray, calibration: Mapping[str, Any]) -> float:
    if not len(raw):
        return math.nan
    return float(np.mean((raw - float(calibration["center"])) / float(calibration["scale"])))


def gate(current: Mapping[str, Any], candidate: Mapping[str, Any], classes: list[str], limits: Limits
         ) -> tuple[bool, str, dict[str, Any]]:
    """(passes, reason, numbers) for two evaluations (`scored` results) of the same classes."""
    numbers: dict[str, Any] = {"classes": {}}
    problems: list[str] = []
    for cls in classes:
        a, b = figures(current["classes"][cls]), figures(candidate["classes"][cls])
        numbers["classes"][cls] = {"current": a, "candidate": b}
        problems += _class_problems(cls, a, b, limits)
    totals = {who: _totals([numbers["classes"][c][who] for c in classes]) for who in ("current", "candidate")}
    numbers["held_out"] = {"false_alarms": {
        "n": totals["current"]["held_n"],
        "flagged_current": totals["current"]["held_flagged"], "flagged_candidate": totals["candidate"]["held_flagged"],
        "mean_current": totals["current"]["held_mean"], "mean_candidate": totals["candidate"]["held_mean"]},
        "defects": {"n": totals["current"]["held_defects"]}}
    numbers["trained"] = {"false_alarms": {
        "n": totals["current"]["trained_n"], "flagged_current": totals["current"]["trained_flagged"],
        "flagged_candidate": totals["candidate"]["trained_flagged"]}}
    held = numbers["held_out"]["false_alarms"]
    if not held["n"]:
        problems.append("no held-out false alarm to check the candidate on; it waits for more reviews")
    elif held["flagged_current"]:
        if held["flagged_candidate"] >= held["flagged_current"]:
            problems.append(f"the held-out false alarms are not fewer: {held['flagged_current']} -> "
                            f"{held['flagged_candidate']} of {held['n']} above the threshold")
    elif not held["mean_candidate"] < held["mean_current"]:
        problems.append(f"the held-out false alarms do not score lower ({held['mean_current']:.2f} -> "
                        f"{held['mean_candidate']:.2f}, normalised)")
    summary = _summary(numbers)
    if problems:
        return False, "; ".join(problems) + f" ({summary})", numbers
    return True, (f"no class worse than allowed (image AUROC -{limits.max_regression:g}, recall "
                  f"-{limits.max_recall_drop:g}, test false-alarm rate +{limits.max_false_alarm_rise:g}); "
                  f"{summary}"), numbers


def _class_problems(cls: str, a: dict[str, Any], b: dict[str, Any], limits: Limits) -> list[str]:
    out = []
    if math.isfinite(a["auroc"]) and not b["auroc"] >= a["auroc"] - limits.max_regression:
        out.append(f"class {cls}: image AUROC {a['auroc']:.3f} -> {b['auroc']:.3f}, more than the allowed "
                   f"{limits.max_regression:+.3f} drop")
    if math.isfinite(a["recall"]) and not b["recall"] >= a["recall"] - limits.max_recall_drop:
        out.append(f"class {cls}: recall at the threshold {a['recall']:.1%} -> {b['recall']:.1%} of "
                   f"{a['defects']} defects, more than the allowed {limits.max_recall_drop:.1%} drop")
    if math.isfinite(a["false_alarm_rate_test"]) \
            and not b["false_alarm_rate_test"] <= a["false_alarm_rate_test"] + limits.max_false_alarm_rise:
        out.append(f"class {cls}: false-alarm rate on good test images {a['false_alarm_rate_test']:.1%} -> "
                   f"{b['false_alarm_rate_test']:.1%}, more than the allowed {limits.max_false_alarm_rise:.1%} rise")
    if b["held_out_false_alarms_flagged"] > a["held_out_false_alarms_flagged"]:
        out.append(f"class {cls}: {a['held_out_false_alarms_flagged']} -> {b['held_out_false_alarms_flagged']} "
                   f"of {a['held_out_false_alarms']} held-out false alarms above the threshold")
    return out


def _totals(figs: list[dict[str, Any]]) -> dict[str, Any]:
    held_n = sum(f["held_out_false_alarms"] for f in figs)
    means = [(f["held_out_false_alarm_mean"], f["held_out_false_alarms"]) for f in figs if f["held_out_false_alarms"]]
    return {
        "held_n": held_n,
        "held_flagged": sum(f["held_out_false_alarms_flagged"] for f in figs),
        "held_mean": sum(m * n for m, n in means) / held_n if held_n else math.nan,
        "held_defects": sum(f["held_out_defects"] for f in figs),
        "trained_n": sum(f["trained_false_alarms"] for f in figs),
        "trained_flagged": sum(f["trained_false_alarms_flagged"] for f in figs),
    }


def _summary(numbers: dict[str, Any]) -> str:
    """The figures people read: held-out false alarms, then per class recall and test false-alarm rate."""
    held, trained = numbers["held_out"]["false_alarms"], numbers["trained"]["false_alarms"]
    parts = [f"held-out false alarms above the threshold {held['flagged_current']} -> {held['flagged_candidate']} "
             f"of {held['n']}",
             f"trained-on {trained['flagged_current']} -> {trained['flagged_candidate']} of {trained['n']}"]
    for cls, both in numbers["classes"].items():
        a, b = both["current"], both["candidate"]
        parts.append(f"{cls}: recall {_pct(a['recall'])} -> {_pct(b['recall'])}, false alarms on good test images "
                     f"{_pct(a['false_alarm_rate_test'])} -> {_pct(b['false_alarm_rate_test'])}")
    return "; ".join(parts)


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.1%}"
