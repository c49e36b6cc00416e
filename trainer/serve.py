"""`kdfleet trainer serve`: retrain from reviewed results and roll out what passes the gate.

One cycle:

1. collect: page through the hub's /api/training-data for results whose
   latest review is `false_alarm` (new normal images of their class) or
   `defect` (new test anomalies), download their frames into WORKDIR/inbox;
2. wait until --min-new images arrived that no candidate was trained on yet;
3. fine-tune the current model's checkpoint with the method's own training
   loop on the base data set plus every collected normal (QAT after it for
   --precision int8);
4. gate: per class, the image AUROC on the held-out test set plus the
   reviewed defects may not drop by more than --max-regression, and the
   false alarms' normalised scores must go down on average;
5. publish: export and sign the package (its manifest names the parent
   version), upload it (POST /api/models) and start a rollout (POST /api/rollouts).

WORKDIR/state.json remembers what was collected and trained on and which
model is current; WORKDIR/cycles.jsonl holds one line per cycle with its outcome
and reason.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("kdfleet.trainer.serve")

STATE = "state.json"
CYCLES = "cycles.jsonl"
LABELS = {"false_alarm": "normal", "defect": "defect"}   # review label -> what the image becomes
TOKEN_ENV = "KDFLEET_HUB_TOKEN"


class ServeError(RuntimeError):
    """A cycle cannot go on: the hub refused or cannot be reached, or an input is unusable."""


@dataclass(frozen=True)
class ServeConfig:
    """What `kdfleet trainer serve` was told; validated once in `parse_config`."""

    hub: str
    token: str
    workdir: Path
    data: Path
    base: Path
    key: Path | None = None
    min_new: int = 20                 # fewer new images rarely move a model; retraining costs minutes
    max_regression: float = 0.01      # one misranked pair in ~100 is the most a class may lose
    precision: str = "fp32"
    epochs: int = 5                   # fine-tune epochs on top of the checkpoint's
    qat_epochs: int = 3
    model_id: str | None = None       # the registry name; default the package's METHOD-BACKBONE-SCOPE-SIZE
    parent_version: str = "0.1.0"     # the base checkpoint's version when the hub has none registered
    site: str | None = None
    devices: tuple[str, ...] = ()
    canary: str = "1"
    wave_size: int = 0
    soak_s: float = 600.0
    interval_s: float = 3600.0
    threads: int = 0
    latency_runs: int = 5


@dataclass
class Outcome:
    """What a cycle did: status is waiting, refused, published or failed; `reason` says why."""

    status: str
    reason: str
    new_images: int = 0
    gate: dict[str, Any] = field(default_factory=dict)
    version: str | None = None
    hub_model_id: int | None = None
    rollout_id: str | None = None
    package: str | None = None


# -- the hub ------------------------------------------------------------------------

class Hub:
    """The few hub API calls the retraining service makes, over urllib with a bearer token."""

    def __init__(self, url: str, token: str, timeout: float = 60.0) -> None:
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None
                ) -> tuple[bytes, str]:
        """(body, content type) of the answer; ServeError naming the hub's own reason on failure."""
        url = path if path.startswith("http") else self.url + path
        req = urllib.request.Request(url, data=body, method=method,
                                     headers={"Authorization": f"Bearer {self.token}"})
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode(errors="replace")
            try:
                detail = json.loads(detail).get("detail", detail)
            except (ValueError, AttributeError):
                pass
            hint = {401: "; check --token / KDFLEET_HUB_TOKEN", 403: "; the token needs the admin role"}
            raise ServeError(f"{method} {url}: {exc.code} {detail}{hint.get(exc.code, '')}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ServeError(f"{method} {url}: cannot reach the hub ({exc}); check --hub") from None

    def get_json(self, path: str, **query: Any) -> Any:
        args = {k: v for k, v in query.items() if v is not None}
        sep = "&" if "?" in path else "?"
        body, _ = self.request("GET", path + (sep + urllib.parse.urlencode(args) if args else ""))
        return json.loads(body)

    def post_json(self, path: str, payload: dict[str, Any]) -> Any:
        body, _ = self.request("POST", path, json.dumps(payload).encode(), "application/json")
        return json.loads(body)

    def reviewed(self, label: str, since: str | None) -> list[dict[str, Any]]:
        """Every result whose latest review is `label`, reviewed at or after `since`, across pages."""
        items, page = [], self.get_json("/api/training-data", label=label, since=since, limit=500)
        while True:
            items += page["items"]
            if not page.get("next"):
                return items
            page = self.get_json(page["next"])

    def upload(self, package: Path, notes: str) -> dict[str, Any]:
        """POST /api/models with the package as multipart field `package`; the registered model."""
        boundary = uuid.uuid4().hex
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="notes"\r\n\r\n{notes}\r\n'.encode(),
            (f'--{boundary}\r\nContent-Disposition: form-data; name="package"; filename="{package.name}"\r\n'
             "Content-Type: application/x-tar\r\n\r\n").encode() + package.read_bytes() + b"\r\n",
            f"--{boundary}--\r\n".encode(),
        ]
        body, _ = self.request("POST", "/api/models", b"".join(parts), f"multipart/form-data; boundary={boundary}")
        return json.loads(body)


# -- state ---------------------------------------------------------------------------

def load_state(workdir: Path) -> dict[str, Any]:
    path = workdir / STATE
    if not path.exists():
        return {"collected": {}, "trained": [], "since": {}, "current": None, "cycle": 0}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ServeError(f"{path} is not valid JSON ({exc}); fix it or move it away to start afresh") from None


def save_state(workdir: Path, state: dict[str, Any]) -> None:
    tmp = workdir / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    tmp.replace(workdir / STATE)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def collect(hub: Hub, state: dict[str, Any], workdir: Path, classes: list[str]) -> int:
    """Download newly reviewed images into WORKDIR/inbox; returns how many arrived."""
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
            target = workdir / "inbox" / _safe(cls) / role / f"{_safe(rid)}{suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            if known:   # re-reviewed: a false alarm later found a defect, or the other way round
                log.info("result %s was re-reviewed: now %s", rid, label)
                Path(known["file"]).unlink(missing_ok=True)
            state["collected"][rid] = {"cls": cls, "role": role, "file": str(target), "score": item.get("score"),
                                       "reviewed_at": item["created_at"]}
            arrived += 1
        if items:
            state["since"][label] = max(i["created_at"] for i in items)
    return arrived


# -- data ------------------------------------------------------------------------------

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


# -- the cycle ---------------------------------------------------------------------------

def current_model(cfg: ServeConfig, state: dict[str, Any]) -> dict[str, Any]:
    """The model now in service: the last published candidate, else --base."""
    return state.get("current") or {"checkpoint": str(cfg.base), "package": None, "version": None}


def fine_tune(cfg: ServeConfig, checkpoint: Path, data: Path, out: Path) -> Path:
    """Go on training `checkpoint` for cfg.epochs more epochs on `data` with the method's loop; the best.pt.

    The checkpoint is seeded as the run's last.pt and resumed: its weights and optimizer state carry
    over and the learning rate follows the tail of the run's cosine schedule. The best validation
    loss starts afresh, because the validation images are now others.
    """
    import torch

    from trainer.train import LAST, TrainConfig, print_progress, train

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    old = TrainConfig.from_dict(ckpt["config"])
    tcfg = dataclasses.replace(old, data=str(data), out=str(out), epochs=int(ckpt["epoch"]) + cfg.epochs,
                               threads=cfg.threads or old.threads)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.update(config=tcfg.to_dict(), best_val=math.inf)
    torch.save(ckpt, out / LAST)
    return train(tcfg, progress=print_progress, resume=True)


def quantize(cfg: ServeConfig, checkpoint: Path, out: Path) -> tuple[Path, dict[str, Any]]:
    """QAT of the fine-tuned checkpoint (trainer.quantize.qat): the INT8 ONNX and its manifest recipe."""
    from trainer.quantize.qat import QATConfig, run_qat

    res = run_qat(checkpoint, out, QATConfig(epochs=cfg.qat_epochs, threads=cfg.threads),
                  progress=lambda s: log.info("  %s", s))
    return res.path, res.recipe()


def scored(runner: Any, data: Path, classes: list[str], val_fraction: float, seed: int,
           collected: dict[str, dict[str, Any]], sigma: float, latency_runs: int) -> dict[str, Any]:
    """evaluate() with per-image details, plus the normalised scores of the collected normals and defects."""
    from shared.scoring import ClassCalibration
    from trainer.evaluate import evaluate, score_images

    result = evaluate(runner, data, classes, runner.size, sigma=sigma, val_fraction=val_fraction, seed=seed,
                      latency_runs=latency_runs, details=True, progress=lambda s: log.info("  evaluating %s", s))
    for cls in classes:
        cal = ClassCalibration.from_dict(result["classes"][cls]["calibration"])
        for role in ("normal", "defect"):
            paths = [c["file"] for c in collected.values() if c["cls"] == cls and c["role"] == role]
            raw, _ = score_images(runner, paths, sigma, reference=cal.reference)
            result["classes"][cls][f"hub_{role}_raw"] = raw.tolist()
            result["classes"][cls][f"hub_{role}"] = [float(cal.normalise(s)) for s in raw]
    return result


def gate(current: dict[str, Any], candidate: dict[str, Any], classes: list[str], max_regression: float
         ) -> tuple[bool, str, dict[str, Any]]:
    """(passes, reason, numbers): per class the image AUROC on the test set plus the reviewed defects,
    and the mean normalised score of the false alarms, current vs candidate."""
    from shared.metrics import auroc

    def class_auroc(r: dict[str, Any], cls: str) -> float:
        m = r["classes"][cls]
        defects = np.asarray(m["hub_defect_raw"], float)
        scores = np.r_[np.asarray(m["scores"], float), defects]
        labels = np.r_[np.asarray(m["labels"], float), np.ones(len(defects))]
        return float(auroc(scores, labels)) if 0 < labels.sum() < len(labels) else float("nan")

    numbers: dict[str, Any] = {"classes": {}}
    problems = []
    for cls in classes:
        a, b = class_auroc(current, cls), class_auroc(candidate, cls)
        numbers["classes"][cls] = {"auroc_current": a, "auroc_candidate": b}
        if math.isfinite(a) and (not math.isfinite(b) or b < a - max_regression):
            problems.append(f"class {cls}: image AUROC {a:.3f} -> {b:.3f}, more than the allowed "
                            f"{max_regression:+.3f} drop")
    fa_now = [s for cls in classes for s in current["classes"][cls]["hub_normal"]]
    fa_new = [s for cls in classes for s in candidate["classes"][cls]["hub_normal"]]
    numbers["false_alarms"] = {"n": len(fa_now), "mean_current": float(np.mean(fa_now)) if fa_now else None,
                               "mean_candidate": float(np.mean(fa_new)) if fa_new else None,
                               "above_threshold_current": int(sum(s > 1 for s in fa_now)),
                               "above_threshold_candidate": int(sum(s > 1 for s in fa_new))}
    if not fa_now:
        problems.append("no false alarms to check the candidate on")
    elif np.mean(fa_new) >= np.mean(fa_now):
        problems.append(f"the false alarms' mean normalised score did not go down "
                        f"({np.mean(fa_now):.2f} -> {np.mean(fa_new):.2f})")
    if problems:
        return False, "; ".join(problems), numbers
    fa = numbers["false_alarms"]
    return True, (f"no class regressed by more than {max_regression:.3f}; false alarms' mean normalised score "
                  f"{fa['mean_current']:.2f} -> {fa['mean_candidate']:.2f}, "
                  f"{fa['above_threshold_current']} -> {fa['above_threshold_candidate']} of {fa['n']} "
                  "above the threshold"), numbers


def _semver(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3]) or (0,)


def next_version(hub: Hub, name: str, parent: str) -> str:
    """One patch above the newest version of `name` registered on the hub (or of `parent`)."""
    found = [m["version"] for m in hub.get_json("/api/models", name=name)["models"]]
    newest = max([parent, *found], key=_semver)
    major, minor, patch = (*_semver(newest), 0, 0)[:3]
    return f"{major}.{minor}.{patch + 1}"


def build_package(cfg: ServeConfig, checkpoint: Path, onnx_path: Path, result: dict[str, Any], data: Path,
                  version: str, parent: str | None, recipe: dict[str, Any] | None, out: Path) -> Path:
    """The package of the candidate from its own ONNX evaluation; signed with --key."""
    import torch

    from shared.package import load_private_key, write_package
    from trainer.evaluate import onnx_runner
    from trainer.export import build_manifest, golden_images, json_safe
    from trainer.train import TrainConfig

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    tcfg = TrainConfig.from_dict(ckpt["config"])
    manifest = build_manifest(tcfg, result, result["sigma"], version, cfg.model_id, parent, ckpt)
    if recipe is not None:
        manifest["precision"] = "int8"
        manifest["quantization"] = json_safe(recipe)
    golden = golden_images(onnx_runner(onnx_path), data, manifest)
    key = load_private_key(cfg.key) if cfg.key else None
    return write_package(out, manifest, onnx_path, golden, key=key)


def run_cycle(cfg: ServeConfig, hub: Hub) -> Outcome:
    """Collect, and when enough arrived: fine-tune, gate and publish. Never raises ServeError: it is the outcome."""
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    state = load_state(cfg.workdir)
    state["cycle"] += 1
    try:
        outcome = _cycle(cfg, hub, state)
    except ServeError as exc:
        outcome = Outcome("failed", str(exc))
    save_state(cfg.workdir, state)
    log.info("cycle %d: %s: %s", state["cycle"], outcome.status, outcome.reason)
    with open(cfg.workdir / CYCLES, "a") as f:
        f.write(json.dumps({"cycle": state["cycle"], "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            **dataclasses.asdict(outcome)}) + "\n")
    report(hub, cfg, state["cycle"], outcome)
    return outcome


def report(hub: Hub, cfg: ServeConfig, cycle: int, outcome: Outcome) -> None:
    """Tell the hub what the cycle did and why (the dashboard's Retraining table); a failure is only logged."""
    body = {"model_name": cfg.model_id or "", "cycle": cycle, "outcome": outcome.status,
            "reason": outcome.reason[:4000], "new_images": outcome.new_images, "version": outcome.version or "",
            "model_id": outcome.hub_model_id, "rollout_id": outcome.rollout_id or "",
            "gate": json.loads(json.dumps(outcome.gate, default=float))}
    try:
        hub.post_json("/api/retrain-cycles", body)
    except ServeError as exc:
        log.warning("cycle %d not reported to the hub (it stays in %s): %s", cycle, CYCLES, exc)


def _cycle(cfg: ServeConfig, hub: Hub, state: dict[str, Any]) -> Outcome:
    from trainer.evaluate import DEFAULT_SIGMA, make_runner, onnx_runner
    from trainer.export import check_onnx, export_onnx
    from trainer.train import TrainConfig, load_checkpoint

    current = current_model(cfg, state)
    ckpt_path = Path(current["checkpoint"])
    if not ckpt_path.exists():
        raise ServeError(f"the current model's checkpoint {ckpt_path} is missing; give --base")
    cur_cfg, _, _ = load_checkpoint(ckpt_path)
    classes = list(cur_cfg.classes)

    log.info("polling %s for reviewed results since %s", cfg.hub, state["since"] or "the start")
    arrived = collect(hub, state, cfg.workdir, classes)
    save_state(cfg.workdir, state)
    trained = set(state["trained"])
    fresh = [rid for rid in state["collected"] if rid not in trained]
    log.info("%d image(s) arrived; %d not trained on yet (retraining at %d)", arrived, len(fresh), cfg.min_new)
    if len(fresh) < cfg.min_new:
        return Outcome("waiting", f"{len(fresh)} new reviewed image(s), fewer than --min-new {cfg.min_new}",
                       len(fresh))
    collected = state["collected"]
    normals: dict[str, list[Path]] = {}
    for c in collected.values():
        if c["role"] == "normal":
            normals.setdefault(c["cls"], []).append(Path(c["file"]))

    run = cfg.workdir / "cycles" / f"{state['cycle']:04d}"
    data = merged_data(cfg.data, run / "data", classes, normals)
    log.info("fine-tuning %s for %d epoch(s) on %s plus %d new normal image(s)", ckpt_path, cfg.epochs, cfg.data,
             sum(map(len, normals.values())))
    try:
        candidate_ckpt = fine_tune(cfg, ckpt_path, data, run / "train")
        cand_cfg = TrainConfig.from_dict(load_checkpoint(candidate_ckpt)[2]["config"])
        onnx_path, recipe = run / "candidate.onnx", None
        if cfg.precision == "int8":
            log.info("quantisation-aware fine-tune (%d epoch(s)) for INT8", cfg.qat_epochs)
            onnx_path, recipe = quantize(cfg, candidate_ckpt, onnx_path)
        else:
            _, model, _ = load_checkpoint(candidate_ckpt)
            export_onnx(model, cand_cfg.size, onnx_path)
            check_onnx(onnx_path, model, cand_cfg.size)
        sigma = DEFAULT_SIGMA
        log.info("evaluating the current model (%s)", current.get("version") or ckpt_path)
        cur_runner = make_runner(current["package"] or ckpt_path)
        if current["package"]:
            sigma = float(cur_runner.meta["manifest"].get("sigma", sigma))
        cur_data = Path(cur_cfg.data) if current["package"] and Path(cur_cfg.data).exists() else cfg.data
        cur_result = scored(cur_runner, cur_data, classes, cur_cfg.val_fraction, cur_cfg.seed,
                            collected, sigma, cfg.latency_runs)
        log.info("evaluating the candidate")
        cand_result = scored(onnx_runner(onnx_path), data, classes, cand_cfg.val_fraction, cand_cfg.seed,
                             collected, sigma, cfg.latency_runs)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ServeError(f"retraining failed: {exc}") from exc
    passed, reason, numbers = gate(cur_result, cand_result, classes, cfg.max_regression)
    (run / "gate.json").write_text(json.dumps({"passed": passed, "reason": reason, **numbers}, indent=1))
    if not passed:   # these images wait for --min-new more; a failure above retries them next cycle
        state["trained"] = sorted(trained | set(fresh))
        return Outcome("refused", reason, len(fresh), numbers)
    log.info("gate passed: %s", reason)

    name = cfg.model_id or f"{cand_cfg.method}-{cand_cfg.model.backbone}-" \
        f"{'unified' if len(classes) > 1 else classes[0]}-{cand_cfg.size}"
    parent = current.get("version") or cfg.parent_version
    version = next_version(hub, name, parent)
    package = build_package(dataclasses.replace(cfg, model_id=name), candidate_ckpt, onnx_path, cand_result, data,
                            version, parent, recipe, run / f"{_safe(name)}-{version}.kdpkg")
    log.info("uploading %s (%s %s, parent %s)", package, name, version, parent)
    n_normal = sum(map(len, normals.values()))
    registered = hub.upload(package, f"retrained by kdfleet trainer serve on {n_normal} reviewed false alarm(s): "
                                     f"{reason}")
    state["trained"] = sorted(trained | set(fresh))
    state["current"] = {"checkpoint": str(candidate_ckpt), "package": str(package), "version": version,
                        "hub_model_id": registered["id"]}
    outcome = Outcome("published", reason, len(fresh), numbers, version, registered["id"], None, str(package))
    policy: dict[str, Any] = {"model_id": registered["id"], "wave_size": cfg.wave_size, "soak_s": cfg.soak_s,
                              "note": f"retrained {name} {version} from {parent}",
                              "canary": int(cfg.canary) if cfg.canary.isdigit() else cfg.canary}
    if cfg.site:
        policy["site"] = cfg.site
    if cfg.devices:
        policy["devices"] = list(cfg.devices)
    try:
        rollout = hub.post_json("/api/rollouts", policy)
    except ServeError as exc:
        outcome.reason += f"; uploaded as model {registered['id']} but no rollout started: {exc}"
        return outcome
    outcome.rollout_id = rollout["id"]
    log.info("rollout %s started: %s", rollout["id"], rollout.get("counts"))
    return outcome


# -- the command -----------------------------------------------------------------------

def parse_config(argv: list[str] | None) -> tuple[ServeConfig, bool]:
    d = ServeConfig.__dataclass_fields__
    ap = argparse.ArgumentParser(
        prog="kdfleet trainer serve",
        description="Retrain from the hub's reviewed results: false alarms become normal training images, "
                    "confirmed defects test anomalies. Fine-tunes the current model, publishes the candidate "
                    "only when no class's image AUROC drops by more than --max-regression and the false alarms "
                    "score lower, then uploads it and starts a rollout.",
        epilog="State and each cycle's outcome are kept in --workdir (state.json, cycles.jsonl).")
    ap.add_argument("--hub", required=True, help="the hub's base URL, e.g. http://hub:8080")
    ap.add_argument("--token", default=None, help=f"an admin API token (default ${TOKEN_ENV})")
    ap.add_argument("--workdir", type=Path, required=True, help="where images, runs and state are kept")
    ap.add_argument("--data", type=Path, required=True, help="the base MVTec-layout data set")
    ap.add_argument("--base", type=Path, required=True, help="checkpoint of the model in service (best.pt)")
    ap.add_argument("--key", type=Path, default=None, help="Ed25519 private key (PEM) to sign packages")
    ap.add_argument("--min-new", type=int, default=d["min_new"].default,
                    help="new reviewed images needed to retrain (default %(default)s)")
    ap.add_argument("--max-regression", type=float, default=d["max_regression"].default,
                    help="largest allowed drop of any class's image AUROC (default %(default)s)")
    ap.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                    help="fp32, or int8 by quantisation-aware fine-tuning (default fp32)")
    ap.add_argument("--epochs", type=int, default=d["epochs"].default, help="fine-tune epochs (default %(default)s)")
    ap.add_argument("--qat-epochs", type=int, default=d["qat_epochs"].default,
                    help="QAT epochs with --precision int8 (default %(default)s)")
    ap.add_argument("--model-id", default=None, help="registry name (default METHOD-BACKBONE-SCOPE-SIZE)")
    ap.add_argument("--parent-version", default=d["parent_version"].default,
                    help="version of --base when the hub has none of this model (default %(default)s)")
    ap.add_argument("--site", default=None, help="roll out to this site's devices only (default every site)")
    ap.add_argument("--devices", default="", help="comma-separated device names to roll out to")
    ap.add_argument("--canary", default=d["canary"].default, help="canary devices: a count or a percentage")
    ap.add_argument("--wave-size", type=int, default=0, help="devices per wave after the canary; 0: the rest")
    ap.add_argument("--soak", type=float, default=d["soak_s"].default, help="healthy seconds between waves")
    ap.add_argument("--interval", type=float, default=d["interval_s"].default,
                    help="seconds between cycles (default %(default)s)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    ap.add_argument("--once", action="store_true", help="run one cycle and exit (for cron and tests)")
    args = ap.parse_args(argv)
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        ap.error(f"give an admin API token with --token or ${TOKEN_ENV} (kdfleet hub add-token NAME --role admin)")
    for path, what in ((args.data, "--data"), (args.base, "--base")):
        if not path.exists():
            ap.error(f"{what} {path} does not exist")
    if args.key and not args.key.exists():
        ap.error(f"--key {args.key} does not exist; make one with `kdfleet keys new`")
    if args.min_new < 1 or args.epochs < 1 or args.qat_epochs < 0 or args.interval <= 0:
        ap.error("--min-new and --epochs must be at least 1, --qat-epochs at least 0, --interval positive")
    cfg = ServeConfig(hub=args.hub, token=token, workdir=args.workdir, data=args.data, base=args.base, key=args.key,
                      min_new=args.min_new, max_regression=args.max_regression, precision=args.precision,
                      epochs=args.epochs, qat_epochs=args.qat_epochs, model_id=args.model_id,
                      parent_version=args.parent_version, site=args.site,
                      devices=tuple(d for d in args.devices.split(",") if d), canary=args.canary,
                      wave_size=args.wave_size, soak_s=args.soak, interval_s=args.interval, threads=args.threads)
    return cfg, args.once


def main(argv: list[str] | None = None) -> int:
    """Run cycles every --interval seconds until SIGINT/SIGTERM, or one with --once; 1 if the last failed."""
    cfg, once = parse_config(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    hub = Hub(cfg.hub, cfg.token)
    if once:
        return 1 if run_cycle(cfg, hub).status == "failed" else 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    outcome = None
    while not stop.is_set():
        outcome = run_cycle(cfg, hub)
        stop.wait(cfg.interval_s)
    return 1 if outcome is not None and outcome.status == "failed" else 0
