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

This module is the command: its options, checked once into a ServeConfig,
and the loop of cycles. The parts are in trainer/retrain/: the hub client
(hub.py), WORKDIR/state.json and the collected images (workdir.py), the
fleet's model and the versions (lineage.py), the candidate (candidate.py)
and the cycle with its WORKDIR/cycles.jsonl (cycle.py).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path

from trainer.gate import HOLDOUT, Limits
from trainer.retrain.config import ServeConfig
from trainer.retrain.cycle import rollout_policy, run_cycle
from trainer.retrain.hub import Hub, ServeError
from trainer.retrain.lineage import base_model, next_version
from trainer.retrain.workdir import load_state

__all__ = ["Hub", "ServeConfig", "ServeError", "base_model", "load_state", "main", "next_version", "parse_config",
           "rollout_policy"]

TOKEN_ENV = "KDFLEET_HUB_TOKEN"


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
