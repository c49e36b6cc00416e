"""One cycle of the retraining service, and the rollout of what it publishes.

Collect; once --min-new images arrived that no candidate was trained on
yet, fine-tune the model the fleet runs, gate the candidate against it
(trainer/gate.py), and publish one that passes: export and sign the package,
upload it (POST /api/models) and start a rollout with health limits (POST
/api/rollouts; queued by the hub while its devices are busy in another
rollout). WORKDIR/cycles.jsonl holds one line per cycle with its outcome
and reason, and the hub is told it too.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer.gate import gate
from trainer.retrain.candidate import build_package, fine_tune, quantize, scored
from trainer.retrain.config import ServeConfig
from trainer.retrain.hub import Hub, ServeError
from trainer.retrain.lineage import base_model, fetch_package, fleet_model, next_version
from trainer.retrain.workdir import collect, load_state, merged_data, safe_name, save_state

log = logging.getLogger("kdfleet.trainer.serve")

CYCLES = "cycles.jsonl"


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
    from trainer.evaluate import DEFAULT_SIGMA
    from trainer.runners import make_runner, onnx_runner
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
                            version, parent, recipe, run / f"{safe_name(name)}-{version}.kdpkg")
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
