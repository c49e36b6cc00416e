"""`kdfleet trainer serve`: retrain from reviewed results and roll out what passes the gate.

One cycle:

1. collect: page through the hub's /api/training-data for results whose
   latest review is `false_alarm` (new normal images of their class) or
   `defect` (new test anomalies), download their frames into WORKDIR/inbox;
   --holdout of each class's images are kept out of training for the gate;
2. wait until --min-new images arrived that no candidate was trained on yet;
3. fine-tune the checkpoint of the model the fleet runs (asked from the hub:
   a rollback moves it) with the method's own training loop on the base data
   set plus the collected normals not held out (QAT after it for --precision int8);
4. gate (trainer/gate.py): against the fleet's model at the thresholds each
   ships with, on the test set and the held-out reviewed images;
5. publish: export and sign the package (its manifest names the fleet's version
   as parent; a version once built is never reused), upload it (POST
   /api/models) and start a rollout with health limits (POST /api/rollouts;
   queued by the hub while its devices are busy in another rollout).

WORKDIR/state.json remembers what was collected (and its split), what was
trained on, the checkpoint of every release and every version built;
WORKDIR/cycles.jsonl holds one line per cycle with its outcome and reason.
"""
from __future__ import annotations

import argparse
import collections
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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared.scoring import ClassCalibration
from shared.vocabulary import REVIEW_DEFECT, REVIEW_FALSE_ALARM

from trainer.gate import HOLDOUT, SPLITS, Limits, assign_split, gate

log = logging.getLogger("kdfleet.trainer.serve")

STATE = "state.json"
CYCLES = "cycles.jsonl"
LABELS = {REVIEW_FALSE_ALARM: "normal", REVIEW_DEFECT: "defect"}   # review label -> what the image becomes
TOKEN_ENV = "KDFLEET_HUB_TOKEN"


class ServeError(RuntimeError):
    """A cycle cannot go on: the hub refused or cannot be reached, or an input is unusable.

    `status` is the hub's HTTP answer (0: the hub was not reached or not involved)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


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
    limits: Limits = field(default_factory=Limits)   # how much worse than the fleet's model a candidate may be
    holdout: float = HOLDOUT
    precision: str = "fp32"
    epochs: int = 5                   # fine-tune epochs on top of the checkpoint's
    qat_epochs: int = 3
    model_id: str | None = None       # the registry name; default the fleet's model's, else METHOD-BACKBONE-SCOPE-SIZE
    base_version: str | None = None   # the version --base was released as; default what the fleet runs at first
    site: str | None = None
    devices: tuple[str, ...] = ()
    canary: str = "1"
    wave_size: int = 0
    soak_s: float = 600.0
    max_failures: int = 1
    max_anomaly_rate: float | None = None
    # a threshold gone wrong flags nearly everything: 20 points above the device's rate before stops the rollout
    max_anomaly_rise: float | None = 0.2
    max_latency_ms: float | None = None
    wave_timeout_s: float = 1800.0
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
            raise ServeError(f"{method} {url}: {exc.code} {detail}{hint.get(exc.code, '')}", exc.code) from None
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


def _safe(name: str) -> str:
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
            target = workdir / "inbox" / _safe(cls) / role / f"{_safe(rid)}{suffix}"
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


# -- lineage ------------------------------------------------------------------------------

def fleet_model(hub: Hub, cfg: ServeConfig) -> tuple[str, str] | None:
    """(model, version) most of the targeted devices run, as they last told the hub; None when none says.

    With --model-id only devices running that model count."""
    devices = hub.get_json("/api/devices", site=cfg.site)["devices"]
    if cfg.devices:
        devices = [d for d in devices if d["name"] in cfg.devices]
    running = collections.Counter((d["model_id"], d["model_version"]) for d in devices
                                  if d["model_id"] and d["model_version"]
                                  and (cfg.model_id is None or d["model_id"] == cfg.model_id))
    return running.most_common(1)[0][0] if running else None


def base_model(cfg: ServeConfig, state: dict[str, Any], fleet: tuple[str, str] | None) -> dict[str, Any]:
    """The model to fine-tune and gate against: the release of the version the fleet runs.

    --base is the release of --base-version, or, when that is not given, of the version the fleet ran at
    the first cycle. Every published candidate becomes a release. So a failed rollout or a rollback,
    which leave the fleet on an older version, move the base back with it."""
    releases = state["releases"]
    if cfg.base_version:
        state["base_version"] = cfg.base_version
    elif state["base_version"] is None:
        if fleet is None:
            raise ServeError("no targeted device reports its model, so the version --base was released as is "
                             "unknown: give --base-version (or wait until the devices have connected)")
        state["base_version"] = fleet[1]
    releases.setdefault(state["base_version"], {"checkpoint": str(cfg.base), "package": None})
    if cfg.base_version:   # told now: --base is this version's checkpoint
        releases[state["base_version"]]["checkpoint"] = str(cfg.base)
    version = fleet[1] if fleet else state["base_version"]
    if version not in releases:
        raise ServeError(f"the fleet runs {fleet[0]} {version}, and this service has no checkpoint of it (it has "
                         f"{', '.join(sorted(releases))}); give --base its checkpoint and --base-version {version}")
    return {"name": fleet[0] if fleet else cfg.model_id, "version": version, **releases[version]}


def _semver(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3]) or (0,)


def next_version(hub: Hub, name: str, parent: str, built: list[list[str]]) -> str:
    """One patch above the newest version of `name` the hub has, this service ever built (refused or
    failed ones too: a version names one package only), or `parent`."""
    found = [m["version"] for m in hub.get_json("/api/models", name=name)["models"]]
    mine = [v for n, v in built if n == name]
    newest = max([parent, *found, *mine], key=_semver)
    major, minor, patch = (*_semver(newest), 0, 0)[:3]
    return f"{major}.{minor}.{patch + 1}"


def fetch_package(hub: Hub, name: str | None, version: str, workdir: Path) -> Path | None:
    """The package of `name` `version` as the hub hosts it (cached in WORKDIR/packages), for the gate to
    judge the model the fleet runs with its shipped thresholds; None when the hub has no such file."""
    from shared.package import file_sha256

    if not name:
        return None
    found = [m for m in hub.get_json("/api/models", name=name)["models"] if m["version"] == version]
    if not found:
        return None
    path = workdir / "packages" / f"{_safe(name)}-{_safe(version)}.kdpkg"
    if path.exists() and file_sha256(path) == found[0]["sha256"]:
        return path
    try:
        data, _ = hub.request("GET", found[0]["url"])
    except ServeError as exc:
        if exc.status == 404:   # registered, but hosted elsewhere or not at all
            return None
        raise
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if file_sha256(path) != found[0]["sha256"]:
        path.unlink()
        raise ServeError(f"the hub's package of {name} {version} does not have its registered sha256")
    return path


def fine_tune(cfg: ServeConfig, checkpoint: Path, data: Path, out: Path) -> Path:
    """Go on training `checkpoint` for cfg.epochs more epochs on `data` with the method's loop; the best.pt.

    The checkpoint is seeded as the run's last.pt and resumed: its weights and optimizer state carry
    over and the learning rate follows the tail of the run's cosine schedule. The best validation
    loss starts afresh, because the validation images are now others.
    """
    import torch

    from trainer.checkpoint import LAST
    from trainer.config import TrainConfig
    from trainer.train import print_progress, train

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
           collected: dict[str, dict[str, Any]], sigma: float, latency_runs: int,
           shipped: Mapping[str, ClassCalibration] | None = None) -> dict[str, Any]:
    """evaluate() with per-image details, plus the raw scores of the collected images by role and split
    (`hub[role][split]`). With `shipped` (a package's calibration per class), the test set is scored with
    the reference and judged at the threshold the package ships, not at a recalibration."""
    from trainer.evaluate import evaluate, score_images

    result = evaluate(runner, data, classes, runner.size, sigma=sigma, val_fraction=val_fraction, seed=seed,
                      latency_runs=latency_runs, details=True, progress=lambda s: log.info("  evaluating %s", s))
    for cls in classes:
        m = result["classes"][cls]
        if shipped is not None:
            cal = shipped[cls]
            m["scores"] = score_images(runner, m["paths"], sigma, reference=cal.reference)[0].tolist()
            m["calibration"] = cal.to_dict()
        cal = ClassCalibration.from_dict(m["calibration"])
        m["hub"] = {}
        for role in ("normal", "defect"):
            m["hub"][role] = {}
            for split in SPLITS:
                paths = [c["file"] for c in collected.values()
                         if c["cls"] == cls and c["role"] == role and c.get("split", "train") == split]
                m["hub"][role][split] = score_images(runner, paths, sigma, reference=cal.reference)[0].tolist()
    return result


def build_package(cfg: ServeConfig, checkpoint: Path, onnx_path: Path, result: dict[str, Any], data: Path,
                  version: str, parent: str | None, recipe: dict[str, Any] | None, out: Path) -> Path:
    """The package of the candidate from its own ONNX evaluation; signed with --key."""
    import torch

    from shared.package import load_private_key, write_package
    from trainer.evaluate import onnx_runner
    from trainer.export import build_manifest, golden_images
    from trainer.jsonsafe import json_safe
    from trainer.config import TrainConfig

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    tcfg = TrainConfig.from_dict(ckpt["config"])
    manifest = build_manifest(tcfg, result, result["sigma"], version, cfg.model_id, parent, ckpt,
                              precision="fp32" if recipe is None else "int8",
                              quantization=None if recipe is None else json_safe(recipe))
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
    outcome.gate = _finite(outcome.gate)
    save_state(cfg.workdir, state)
    log.info("cycle %d: %s: %s", state["cycle"], outcome.status, outcome.reason)
    with open(cfg.workdir / CYCLES, "a") as f:
        f.write(json.dumps({"cycle": state["cycle"], "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            **dataclasses.asdict(outcome)}) + "\n")
    report(hub, cfg, state["cycle"], outcome)
    return outcome


def _finite(value: Any) -> Any:
    """JSON-safe numbers: NaN and infinities (a class without defects has no recall) become None."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


def report(hub: Hub, cfg: ServeConfig, cycle: int, outcome: Outcome) -> None:
    """Tell the hub what the cycle did and why (the dashboard's Retraining table); a failure is only logged."""
    body = {"model_name": cfg.model_id or "", "cycle": cycle, "outcome": outcome.status,
            "reason": outcome.reason[:4000], "new_images": outcome.new_images, "version": outcome.version or "",
            "model_id": outcome.hub_model_id, "rollout_id": outcome.rollout_id or "", "gate": outcome.gate}
    try:
        hub.post_json("/api/retrain-cycles", body)
    except ServeError as exc:
        log.warning("cycle %d not reported to the hub (it stays in %s): %s", cycle, CYCLES, exc)


def rollout_policy(cfg: ServeConfig, model_id: int, note: str) -> dict[str, Any]:
    """The POST /api/rollouts body: where, the waves, the health limits; queued while devices are busy."""
    policy: dict[str, Any] = {
        "model_id": model_id, "wave_size": cfg.wave_size, "soak_s": cfg.soak_s, "note": note, "queue": True,
        "canary": int(cfg.canary) if cfg.canary.isdigit() else cfg.canary, "max_failures": cfg.max_failures,
        "max_anomaly_rate": cfg.max_anomaly_rate, "max_anomaly_rise": cfg.max_anomaly_rise,
        "max_latency_ms": cfg.max_latency_ms, "wave_timeout_s": cfg.wave_timeout_s}
    if cfg.site:
        policy["site"] = cfg.site
    if cfg.devices:
        policy["devices"] = list(cfg.devices)
    return policy


def start_rollout(hub: Hub, state: dict[str, Any], policy: dict[str, Any]) -> tuple[str | None, str]:
    """(rollout id, what happened) for a published model. When the hub cannot be reached the policy is
    kept and tried again at the next cycle; a refusal (no device left to update) is final."""
    try:
        rollout = hub.post_json("/api/rollouts", policy)
    except ServeError as exc:
        if exc.status in (0, 429) or exc.status >= 500:
            state["unrolled"] = policy
            return None, f"no rollout started yet ({exc}); it is tried again at the next cycle"
        state["unrolled"] = None
        return None, f"no rollout started: {exc}"
    state["unrolled"] = None
    if rollout["state"] == "queued":
        log.info("rollout %s queued: %s", rollout["id"], rollout["note"])
        return rollout["id"], f"rollout {rollout['id']} queued: {rollout['note']}"
    log.info("rollout %s started: %s", rollout["id"], rollout.get("counts"))
    return rollout["id"], f"rollout {rollout['id']} started"


def _cycle(cfg: ServeConfig, hub: Hub, state: dict[str, Any]) -> Outcome:
    from trainer.evaluate import DEFAULT_SIGMA, make_runner, onnx_runner
    from trainer.export import check_onnx, export_onnx
    from trainer.checkpoint import load_checkpoint
    from trainer.config import TrainConfig

    retried = ""
    if state["unrolled"]:   # a published model whose rollout the hub could not take last time
        earlier = state["unrolled"]["model_id"]
        _, what = start_rollout(hub, state, state["unrolled"])
        retried = f"; model {earlier}, whose rollout the hub could not take last time: {what}"
    fleet = fleet_model(hub, cfg)
    base = base_model(cfg, state, fleet)
    ckpt_path = Path(base["checkpoint"])
    if not ckpt_path.exists():
        raise ServeError(f"the checkpoint of {base['version']} ({ckpt_path}) is missing; give --base and "
                         f"--base-version {base['version']}")
    cur_cfg, _, _ = load_checkpoint(ckpt_path)
    classes = list(cur_cfg.classes)
    name = cfg.model_id or base["name"] or f"{cur_cfg.method}-{cur_cfg.model.backbone}-" \
        f"{'unified' if len(classes) > 1 else classes[0]}-{cur_cfg.size}"

    log.info("polling %s for reviewed results since %s", cfg.hub, state["since"] or "the start")
    arrived = collect(hub, state, cfg.workdir, classes, cfg.holdout)
    save_state(cfg.workdir, state)
    trained = set(state["trained"])
    fresh = [rid for rid in state["collected"] if rid not in trained]
    log.info("%d image(s) arrived; %d not trained on yet (retraining at %d)", arrived, len(fresh), cfg.min_new)
    if len(fresh) < cfg.min_new:
        return Outcome("waiting", f"{len(fresh)} new reviewed image(s), fewer than --min-new {cfg.min_new}"
                       + retried, len(fresh))
    collected = state["collected"]
    normals: dict[str, list[Path]] = {}
    for c in collected.values():
        if c["role"] == "normal" and c.get("split", "train") == "train":
            normals.setdefault(c["cls"], []).append(Path(c["file"]))

    run = cfg.workdir / "cycles" / f"{state['cycle']:04d}"
    data = merged_data(cfg.data, run / "data", classes, normals)
    package = base.get("package") or fetch_package(hub, name, base["version"], cfg.workdir)
    log.info("fine-tuning %s %s (%s) for %d epoch(s) on %s plus %d new normal image(s), %d held out for the gate",
             name, base["version"], ckpt_path, cfg.epochs, cfg.data, sum(map(len, normals.values())),
             sum(c.get("split") == "holdout" for c in collected.values()))
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
        log.info("evaluating the fleet's model %s %s (%s)", name, base["version"], package or ckpt_path)
        cur_runner = make_runner(package or ckpt_path)
        shipped = None
        if package:
            sigma, shipped = cur_runner.manifest.sigma, cur_runner.manifest.calibration
        cur_data = Path(cur_cfg.data) if Path(cur_cfg.data).exists() else cfg.data
        cur_result = scored(cur_runner, cur_data, classes, cur_cfg.val_fraction, cur_cfg.seed,
                            collected, sigma, cfg.latency_runs, shipped)
        log.info("evaluating the candidate")
        cand_result = scored(onnx_runner(onnx_path, {"config": cand_cfg.to_dict()}), data, classes,
                             cand_cfg.val_fraction, cand_cfg.seed,
                             collected, sigma, cfg.latency_runs)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ServeError(f"retraining failed: {exc}") from exc
    passed, reason, numbers = gate(cur_result, cand_result, classes, cfg.limits)
    numbers = _finite(numbers)
    (run / "gate.json").write_text(json.dumps({"passed": passed, "reason": reason, "against": base["version"],
                                               **numbers}, indent=1))
    if not passed:   # these images wait for --min-new more; a failure above retries them next cycle
        state["trained"] = sorted(trained | set(fresh))
        return Outcome("refused", reason + retried, len(fresh), numbers)
    log.info("gate passed: %s", reason)

    parent = base["version"]
    version = next_version(hub, name, parent, state["built"])
    state["built"].append([name, version])   # never again, whatever becomes of this one
    save_state(cfg.workdir, state)
    package = build_package(dataclasses.replace(cfg, model_id=name), candidate_ckpt, onnx_path, cand_result, data,
                            version, parent, recipe, run / f"{_safe(name)}-{version}.kdpkg")
    log.info("uploading %s (%s %s, parent %s)", package, name, version, parent)
    n_normal = sum(map(len, normals.values()))
    registered = hub.upload(package, f"retrained by kdfleet trainer serve from {parent} on {n_normal} reviewed "
                                     f"false alarm(s): {reason}"[:4000])
    state["trained"] = sorted(trained | set(fresh))
    state["releases"][version] = {"checkpoint": str(candidate_ckpt), "package": str(package),
                                  "hub_model_id": registered["id"]}
    outcome = Outcome("published", reason, len(fresh), numbers, version, registered["id"], None, str(package))
    rid, what = start_rollout(hub, state, rollout_policy(cfg, registered["id"],
                                                         f"retrained {name} {version} from {parent}"))
    outcome.rollout_id = rid
    outcome.reason += f"; {what}{retried}"
    return outcome


# -- the command -----------------------------------------------------------------------

def parse_config(argv: list[str] | None) -> tuple[ServeConfig, bool]:
    d = ServeConfig.__dataclass_fields__
    lim = Limits()
    ap = argparse.ArgumentParser(
        prog="kdfleet trainer serve",
        description="Retrain from the hub's reviewed results: false alarms become normal training images, "
                    "confirmed defects test anomalies; a share of each is held out for the gate. Fine-tunes the "
                    "model the fleet runs, publishes the candidate only when, on the test set and the held-out "
                    "images at the thresholds each model ships with, no class loses more image AUROC, recall or "
                    "false-alarm rate than allowed and fewer held-out false alarms are flagged; then uploads it "
                    "and starts a rollout with health limits.",
        epilog="State and each cycle's outcome are kept in --workdir (state.json, cycles.jsonl).")
    ap.add_argument("--hub", required=True, help="the hub's base URL, e.g. http://hub:8080")
    ap.add_argument("--token", default=None, help=f"an admin API token (default ${TOKEN_ENV})")
    ap.add_argument("--workdir", type=Path, required=True, help="where images, runs and state are kept")
    ap.add_argument("--data", type=Path, required=True, help="the base MVTec-layout data set")
    ap.add_argument("--base", type=Path, required=True,
                    help="checkpoint (best.pt) of --base-version, the model the fleet ran when the service began")
    ap.add_argument("--base-version", default=None,
                    help="the version --base was released as (default: the version the targeted devices run "
                         "at the first cycle, as the hub reports it)")
    ap.add_argument("--key", type=Path, default=None, help="Ed25519 private key (PEM) to sign packages")
    ap.add_argument("--min-new", type=int, default=d["min_new"].default,
                    help="new reviewed images needed to retrain (default %(default)s)")
    ap.add_argument("--holdout", type=float, default=HOLDOUT,
                    help="share of each class's reviewed images kept out of training for the gate "
                         "(default %(default)s)")
    ap.add_argument("--max-regression", type=float, default=lim.max_regression,
                    help="largest allowed drop of any class's image AUROC (default %(default)s)")
    ap.add_argument("--max-recall-drop", type=float, default=lim.max_recall_drop,
                    help="largest allowed drop of any class's recall at its threshold (default %(default)s)")
    ap.add_argument("--max-false-alarm-rise", type=float, default=lim.max_false_alarm_rise,
                    help="largest allowed rise of any class's false-alarm rate on good test images at its "
                         "threshold (default %(default)s)")
    ap.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                    help="fp32, or int8 by quantisation-aware fine-tuning (default fp32)")
    ap.add_argument("--epochs", type=int, default=d["epochs"].default, help="fine-tune epochs (default %(default)s)")
    ap.add_argument("--qat-epochs", type=int, default=d["qat_epochs"].default,
                    help="QAT epochs with --precision int8 (default %(default)s)")
    ap.add_argument("--model-id", default=None,
                    help="registry name (default: the fleet's model's, else METHOD-BACKBONE-SCOPE-SIZE)")
    ap.add_argument("--site", default=None, help="roll out to this site's devices only (default every site)")
    ap.add_argument("--devices", default="", help="comma-separated device names to roll out to")
    ap.add_argument("--canary", default=d["canary"].default, help="canary devices: a count or a percentage")
    ap.add_argument("--wave-size", type=int, default=0, help="devices per wave after the canary; 0: the rest")
    ap.add_argument("--soak", type=float, default=d["soak_s"].default, help="healthy seconds between waves")
    ap.add_argument("--max-failures", type=int, default=d["max_failures"].default,
                    help="failed device updates that stop the rollout (default %(default)s)")
    ap.add_argument("--max-anomaly-rate", type=float, default=None,
                    help="an updated device above this anomaly rate (0-1) stops the rollout (default: not checked)")
    ap.add_argument("--max-anomaly-rise", type=float, default=d["max_anomaly_rise"].default,
                    help="an updated device whose anomaly rate rises more than this (0.2: 20 points) above its "
                         "rate on the model before stops the rollout; catches a threshold gone wrong "
                         "(default %(default)s; 0 or less: not checked)")
    ap.add_argument("--max-latency-ms", type=float, default=None,
                    help="an updated device above this p95 latency stops the rollout (default: not checked)")
    ap.add_argument("--wave-timeout", type=float, default=d["wave_timeout_s"].default,
                    help="seconds a told device has to finish its update (default %(default)g)")
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
    if not 0 < args.holdout < 1:
        ap.error("--holdout is a share between 0 and 1 (0.3: three in ten reviewed images)")
    if args.max_failures < 1 or args.wave_timeout <= 0:
        ap.error("--max-failures must be at least 1 and --wave-timeout positive")
    rise = args.max_anomaly_rise if args.max_anomaly_rise is not None and args.max_anomaly_rise > 0 else None
    cfg = ServeConfig(hub=args.hub, token=token, workdir=args.workdir, data=args.data, base=args.base, key=args.key,
                      min_new=args.min_new, holdout=args.holdout,
                      limits=Limits(args.max_regression, args.max_recall_drop, args.max_false_alarm_rise),
                      precision=args.precision, epochs=args.epochs, qat_epochs=args.qat_epochs,
                      model_id=args.model_id, base_version=args.base_version, site=args.site,
                      devices=tuple(d for d in args.devices.split(",") if d), canary=args.canary,
                      wave_size=args.wave_size, soak_s=args.soak, max_failures=args.max_failures,
                      max_anomaly_rate=args.max_anomaly_rate, max_anomaly_rise=rise,
                      max_latency_ms=args.max_latency_ms, wave_timeout_s=args.wave_timeout,
                      interval_s=args.interval, threads=args.threads)
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
