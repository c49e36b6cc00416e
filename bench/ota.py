"""Over-the-air benchmark: a rollout to N running agents with one of them away, then a retraining cycle
from reviewed false alarms to a fleet-wide rollout.

    python -m bench.ota                 # 20 agents, the demo model (trained once, cached in var/bench)
    python -m bench.ota --agents 5 --fps 2 --skip-retrain

Everything is real and on this machine: a private broker (Mosquitto when installed, without
persistence), the hub (SQLite, its API served over HTTP, the ingest and the rollout controller,
trusting the bench's signing key), and N agents (threads of this process) replaying, through ONNX
Runtime, the line: the test images of every class in turn of a second synthetic set (seed 1, kept
apart from the set the model is trained and evaluated on) under changed lighting (`--lighting`, a
gain on every pixel: the plant changed its lamps, so good parts the model never saw that dark
raise false alarms), each agent trusting that key.

1. Rollout. Version 2 is the same network repackaged under a new version and signed. One agent
   is stopped before the rollout starts; the rollout sends the canary, soaks, then the rest; the
   away agent's wave times out (`--wave-timeout`) and the rollout completes without it. The broker
   is then restarted without persistence, so the retained desired models are gone, and the away
   agent comes back: the hub tells it again when it reconnects and it catches up. Printed: time to
   complete, the catch-up, the inference stall at each swap, and that every result made reached
   the hub.
2. Retraining. Anomalies on good test images are reviewed as false alarms and anomalies on defect
   images as confirmed defects (one review per distinct image, through the API), `kdfleet trainer
   serve --once` fine-tunes the fleet's model, gates it on the held-out reviews and, when it passes,
   rolls it out to every agent. Printed: the gate's figures on held-out and trained-on images, the
   cycle's time, the rollout's, and the line's own false-alarm rate and recall (results on good and
   defect images) before and after, measured in the same run.

One module past the usual length: a benchmark is read as a whole, from the fleet it starts to the
table it prints, and nothing else imports its parts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from werkzeug.serving import make_server

from agent.config import load
from agent.pipeline import Agent
from agent.spool import Spool
from hub.db.models import Device, Result, Site
from hub.db.session import Database, upgrade
from hub.ingest import Ingest
from hub.rollouts import RolloutController
from hub.services import rollouts, users
from hub.store import ImageStore
from hub.web import create_app
from shared import package as pkg
from shared.config import BrokerConfig
from kdfleet.demo import broker_argv, pick_port, register_package
from kdfleet.fleet import demo_model

SITE = "bench-ota"
SOAK_S = 2.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def repackage(src: Path, out: Path, version: str, key: pkg.Ed25519PrivateKey) -> Path:
    """The same network under another version, signed: what a retrain ships, minus the training."""
    p = pkg.read_package(src)
    model = out.with_suffix(".onnx")
    model.write_bytes(p.model)
    path = pkg.write_package(out, p.manifest.as_version(version), model, list(p.golden), key=key)
    model.unlink()
    return path


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.3).close()
        return True
    except OSError:
        return False


def wait(predicate, timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.1)
    raise SystemExit(f"bench.ota: timed out after {timeout:.0f} s waiting for {what}")


class Bench:
    """The site: broker, hub and agents, and what the two parts measure on it."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.stops: list[Any] = []
        self.agents: dict[str, Agent] = {}
        self.runners: dict[str, threading.Thread] = {}
        self.retired: list[Agent] = []   # earlier instances of restarted agents: their results count too
        self.broker: subprocess.Popen | None = None

    # -- the site ----------------------------------------------------------------------------

    def start_broker(self) -> None:
        self.broker = subprocess.Popen(broker_argv(self.work, self.port), stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        wait(lambda: port_open(self.port), 10, f"the broker on port {self.port}")

    def stop_broker(self) -> None:
        if self.broker is not None:
            self.broker.terminate()
            self.broker.wait(10)

    def start(self, data: Path, package: Path) -> None:
        args, work = self.args, self.work
        self.key = pkg.new_key()
        self.pub = pkg.save_keypair(self.key, work / "keys" / "site.key")
        self.versions = {v: repackage(package, work / f"v{v[0]}.kdpkg", v, self.key) for v in ("1.0.0", "2.0.0")}
        manifest = pkg.read_package(self.versions["1.0.0"]).manifest
        self.name, classes = manifest.model_id, list(manifest.classes)
        self.port = pick_port(18830)
        self.start_broker()
        self.db = Database(f"sqlite:///{work / 'hub.db'}")
        upgrade(self.db)
        with self.db.transaction() as s:
            self.admin = users.create_token(s, "bench-admin", "admin")[1]
            self.operator = users.create_token(s, "bench-operator", "operator")[1]
            self.device_token = users.create_token(s, "bench-device", "viewer")[1]
        app = create_app({"HUB_DB_URL": self.db.engine.url.render_as_string(hide_password=False),
                          "HUB_DATA_DIR": str(work / "hub"), "HUB_TRUSTED_KEYS": [str(self.pub)]})
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.stops.append(server.shutdown)
        self.hub_url = f"http://127.0.0.1:{server.server_port}"
        self.ids = {v: register_package(self.hub_url, self.admin, p)["id"] for v, p in self.versions.items()}
        bc = BrokerConfig("127.0.0.1", self.port)
        ingest = Ingest(self.db, ImageStore(work / "hub" / "images"), bc, client_id="bench-ingest",
                        shared_group=None, persistent=False).start()
        self.stops.append(ingest.stop)
        self.controller = RolloutController(self.db, bc, interval_s=0.25, client_id="bench-rollouts").start()
        self.stops.append(self.controller.stop)
        ingest.wait_ready(10)
        self.controller.wait_ready(10)
        log(f"starting {args.agents} agents on 1.0.0 ({', '.join(classes)} in turn, {args.fps:g} frames/s each)")
        self.configs = {}
        for i in range(args.agents):
            cls = classes[i % len(classes)]
            device = f"cam-{i:02d}"
            self.configs[device] = load(None, {
                "device": device, "site": SITE, "package": str(self.versions["1.0.0"]), "trusted_keys": [str(self.pub)],
                "broker": f"mqtt://127.0.0.1:{self.port}", "runtime": "onnxruntime", "threads": 1,
                "sources": [{"uri": str(data / cls / "test"), "cls": cls, "fps": args.fps, "loop": True}],
                "spool": {"path": str(work / f"spool-{i}.db")}, "metrics_interval_s": 2.0,
                "update": {"models_dir": str(work / f"models-{i}"), "hub_url": self.hub_url,
                           "hub_token": self.device_token}}, environ={})
            self.run_agent(device)
        self.stops.insert(0, lambda: [a.stop.set() for a in self.agents.values()])
        wait(lambda: self.online("1.0.0") >= args.agents, 120, "every agent online on 1.0.0")

    def run_agent(self, device: str) -> Agent:
        agent = Agent(self.configs[device])
        self.agents[device] = agent
        self.runners[device] = threading.Thread(target=agent.run, daemon=True)
        self.runners[device].start()
        return agent

    def stop_agent(self, device: str) -> None:
        agent = self.agents.pop(device)
        agent.stop.set()
        self.runners.pop(device).join(30)
        self.retired.append(agent)

    def online(self, version: str) -> int:
        with self.db.transaction() as s:
            return s.scalar(select(func.count()).select_from(Device).join(Site)
                            .where(Site.name == SITE, Device.model_version == version, Device.online))

    def detail(self, rid: str) -> rollouts.RolloutDetail:
        with self.db.transaction() as s:
            return rollouts.rollout_detail(s, rid)

    def stop(self) -> tuple[int, int, int]:
        """Stop the agents; (results made, stored by the hub, left in the spools)."""
        for agent in self.agents.values():
            agent.stop.set()
        for runner in self.runners.values():
            runner.join(30)
        made = sum(a.counters.spooled for a in [*self.agents.values(), *self.retired])
        left = 0
        for cfg in self.configs.values():
            spool = Spool(cfg.spool.path)
            left += spool.depth()
            spool.close()
        wait(lambda: self.stored() >= made - left, 60, "the hub to store what was delivered")
        return made, self.stored(), left

    def stored(self) -> int:
        with self.db.transaction() as s:
            return s.scalar(select(func.count()).select_from(Result).join(Device).join(Site)
                            .where(Site.name == SITE))

    def close(self) -> None:
        for stop in self.stops:
            try:
                stop()
            except Exception as exc:
                log(f"while stopping: {exc}")
        self.stop_broker()

    # -- part 1: a rollout with an agent away -------------------------------------------------

    def rollout_with_one_away(self) -> dict[str, Any]:
        args = self.args
        away = sorted(self.agents)[-1]   # in the last wave
        log(f"{away} goes away; rolling out 2.0.0: one canary, a soak of {SOAK_S:g} s, then the rest "
            f"(wave timeout {args.wave_timeout:g} s)")
        self.stop_agent(away)
        with self.db.transaction() as s:
            rid = rollouts.start_rollout(s, self.ids["2.0.0"], rollouts.Policy(
                canary=1, soak_s=SOAK_S, wave_timeout_s=args.wave_timeout), site=SITE)
        started = time.monotonic()
        wait(lambda: self.detail(rid).state in ("completed", "failed"), 300, "the rollout to end")
        took = time.monotonic() - started
        done = self.detail(rid)
        running = sum(a.active.package.version == "2.0.0" for a in self.agents.values())
        time.sleep(3.5)   # inference after the last swap
        canary = done.targets[0].device
        stalls = {d: inference_stall(a, args.fps) for d, a in self.agents.items()}
        log("restarting the broker without persistence: every retained desired model is gone")
        self.stop_broker()
        self.start_broker()
        self.controller.wait_ready(30)
        log(f"{away} comes back on 1.0.0")
        resent = self.controller.resent
        back = time.monotonic()
        late = self.run_agent(away)
        wait(lambda: late.active.package.version == "2.0.0", 120, f"{away} to catch up")
        caught = time.monotonic() - back
        wait(lambda: {t.device: t.state for t in self.detail(rid).targets}[away] == "active", 30,
             f"{away} active on 2.0.0 in the rollout")
        time.sleep(3.5)
        return {"rollout": rid, "state": done.state, "note": done.note, "took": took, "running": running,
                "away": away, "away_state": {t.device: t.state for t in done.targets}[away], "caught_up": caught,
                "resent": self.controller.resent - resent, "late_stall": inference_stall(late, args.fps),
                "canary_stall": stalls.pop(canary), "wave_stalls": [v for v in stalls.values() if v is not None]}

    # -- part 2: reviewed false alarms to a fleet-wide rollout ---------------------------------

    def line_figures(self, version: str) -> dict[str, float]:
        """The line's own rates on `version`: false alarms on good images, defects flagged (recall)."""
        with self.db.transaction() as s:
            rows = s.execute(select(Result.source, Result.verdict).join(Device).join(Site)
                             .where(Site.name == SITE, Result.model_version == version)).all()
        good = [v == "anomaly" for src, v in rows if src.startswith("good/")]
        bad = [v == "anomaly" for src, v in rows if not src.startswith("good/")]
        return {"results": len(rows), "false_alarm_rate": sum(good) / max(len(good), 1),
                "recall": sum(bad) / max(len(bad), 1), "good": len(good), "defects": len(bad)}

    def review(self) -> tuple[int, int]:
        """Review one result per distinct anomalous image, as an operator does on the dashboard."""
        with self.db.transaction() as s:
            rows = s.execute(select(func.min(Result.id), Result.source).join(Device).join(Site)
                             .where(Site.name == SITE, Result.verdict == "anomaly")
                             .group_by(Result.class_id, Result.source)).all()
        counts = {"false_alarm": 0, "defect": 0}
        for rid, source in rows:
            label = "false_alarm" if source.startswith("good/") else "defect"
            body = json.dumps({"label": label, "note": f"bench: {source}"}).encode()
            request = urllib.request.Request(f"{self.hub_url}/api/results/{rid}/reviews", data=body, method="POST",
                                             headers={"Authorization": f"Bearer {self.operator}",
                                                      "Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=30).read()
            counts[label] += 1
        return counts["false_alarm"], counts["defect"]

    def retrain(self, checkpoint: Path, data: Path) -> dict[str, Any]:
        from trainer.serve import main as serve

        args = self.args
        before = self.line_figures("2.0.0")
        false_alarms, defects = self.review()
        log(f"reviewed {false_alarms} false alarms and {defects} confirmed defects (distinct images); "
            "kdfleet trainer serve --once")
        workdir = self.work / "retrain"
        started = time.monotonic()
        rc = serve(["--hub", self.hub_url, "--token", self.admin, "--workdir", str(workdir), "--data", str(data),
                    "--base", str(checkpoint), "--key", str(self.work / "keys" / "site.key"), "--site", SITE,
                    "--min-new", "1", "--epochs", str(args.epochs), "--threads", "2", "--canary", "1",
                    "--soak", str(SOAK_S), "--wave-timeout", str(args.wave_timeout), "--once"])
        cycle_s = time.monotonic() - started
        cycle = json.loads((workdir / "cycles.jsonl").read_text().splitlines()[-1])
        out = {"rc": rc, "cycle": cycle, "cycle_s": cycle_s, "false_alarms": false_alarms, "defects": defects,
               "before": before}
        if cycle["status"] != "published" or not cycle["rollout_id"]:
            return out
        version = cycle["version"]
        rollout_started = time.monotonic()
        wait(lambda: self.detail(cycle["rollout_id"]).state in ("completed", "failed"), 600,
             "the retrained model's rollout to end")
        out["rollout_s"] = time.monotonic() - rollout_started
        out["rollout"] = self.detail(cycle["rollout_id"])
        out["running"] = sum(a.active.package.version == version for a in self.agents.values())
        log(f"watching the line on {version} for {args.observe:g} s")
        time.sleep(args.observe)
        out["after"] = self.line_figures(version)
        return out


def inference_stall(agent: Agent, fps: float) -> float | None:
    """The longest pause of an agent's inference within 3 s of its swap, beyond its frame interval."""
    swapped = agent.updates.swapped_at
    with agent.counters.lock:
        times = [t for t in agent.counters.infer_at if swapped is not None and abs(t - swapped) <= 3.0]
    if len(times) < 2:
        return None
    return max(0.0, max(b - a for a, b in itertools.pairwise(times)) - 1.0 / fps)


def line_images(cache: Path, gain: float) -> Path:
    """CACHE/line-GAIN/CLASS/test: the test images of a second synthetic set (seed 1), every pixel times
    `gain`; made once."""
    import cv2
    import numpy as np

    other, line = cache / "line-data", cache / f"line-{gain:g}"
    if not (other / ".complete").exists():
        log(f"generating the line's images in {other}")
        subprocess.run([sys.executable, "-m", "trainer", "data", "synth", str(other), "--seed", "1"], check=True)
        (other / ".complete").touch()
    if not (line / ".complete").exists():
        for src in sorted(other.glob("*/test/*/*.png")):
            dst = line / src.relative_to(other)
            dst.parent.mkdir(parents=True, exist_ok=True)
            img = cv2.imread(str(src), cv2.IMREAD_COLOR)
            cv2.imwrite(str(dst), np.clip(img.astype(np.float32) * gain, 0, 255).astype(np.uint8))
        (line / ".complete").touch()
    return line


def checkpoint_of(package: Path) -> Path:
    """The demo model's training checkpoint (trainer.export.quick_package keeps run-TAG beside quick-TAG)."""
    tag = package.stem.removeprefix("quick-")
    path = package.parent / f"run-{tag}" / "best.pt"
    if not path.exists():
        raise SystemExit(f"bench.ota: no checkpoint {path} beside {package}; delete {package} to train it again")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ota", description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=20)
    ap.add_argument("--fps", type=float, default=4.0, help="frames per second each agent replays")
    ap.add_argument("--wave-timeout", type=float, default=20.0, help="seconds a told device has to finish")
    ap.add_argument("--epochs", type=int, default=5, help="fine-tune epochs of the retraining cycle")
    ap.add_argument("--lighting", type=float, default=1.2, help="gain on the line's pixels (1: as trained)")
    ap.add_argument("--observe", type=float, default=60.0, help="seconds the line runs on the retrained model")
    ap.add_argument("--skip-retrain", action="store_true", help="only the rollout")
    ap.add_argument("--cache", type=Path, default=Path("var/bench"), help="where the demo model is kept")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)   # one line per request otherwise

    args.cache.mkdir(parents=True, exist_ok=True)
    log("preparing the demo model")
    data, package = demo_model(sys.executable, args.cache.resolve())
    line = line_images(args.cache.resolve(), args.lighting)
    bench = Bench(args, Path(tempfile.mkdtemp(prefix="kdfleet-bench-ota-")))
    retrain: dict[str, Any] | None = None
    try:
        bench.start(line, package)
        time.sleep(3.0)   # a few seconds of steady results before the rollout
        roll = bench.rollout_with_one_away()
        if not args.skip_retrain:
            retrain = bench.retrain(checkpoint_of(package), data)
        made, stored, left = bench.stop()
    finally:
        bench.close()
    report(args, roll, retrain, made, stored, left)
    return 0


def report(args: argparse.Namespace, roll: dict[str, Any], retrain: dict[str, Any] | None, made: int, stored: int,
           left: int) -> None:
    n = args.agents
    print()
    print(f"| rollout to {n} agents, one away | value | target |")
    print("|---|---|---|")
    print(f"| state | {roll['state']} ({roll['running']} of the {n - 1} online on 2.0.0); {roll['away']} "
          f"{roll['away_state']} | completed, the away one left behind |")
    print(f"| start to completed (incl. {SOAK_S:g} s canary soak and the {args.wave_timeout:g} s wave timeout) "
          f"| {roll['took']:.1f} s | <= 60 s |")
    print(f"| away agent back after a broker restart without persistence: told again, on 2.0.0 after "
          f"| {roll['caught_up']:.1f} s ({roll['resent']} desired model(s) sent again) | it catches up |")
    stalls = [s for s in (roll["canary_stall"], roll["late_stall"], *roll["wave_stalls"]) if s is not None]
    if roll["wave_stalls"]:
        print(f"| inference stall at the swap: canary / the other {len(roll['wave_stalls'])} (at once on this "
              f"machine) median, worst / the late one | {_s(roll['canary_stall'])} / "
              f"{statistics.median(roll['wave_stalls']):.2f} s, {max(roll['wave_stalls']):.2f} s / "
              f"{_s(roll['late_stall'])} | <= 1 s |")
    print(f"| results made / stored by the hub / left in spools at the stop | {made} / {stored} / {left} "
          "| made = stored + left |")
    ok = roll["state"] == "completed" and roll["took"] <= 60 and max(stalls, default=0) <= 1.0 \
        and stored + left >= made
    if retrain is not None:
        ok = report_retrain(retrain, n) and ok
    print(f"\ntargets {'met' if ok else 'NOT met'}")


def report_retrain(r: dict[str, Any], n: int) -> bool:
    cycle = r["cycle"]
    print()
    print("| retraining cycle | value |")
    print("|---|---|")
    print(f"| reviewed (one per distinct anomalous image) | {r['false_alarms']} false alarms, {r['defects']} "
          "confirmed defects |")
    print(f"| outcome | {cycle['status']}: {cycle['version'] or '-'} (exit {r['rc']}) |")
    print(f"| cycle (collect, fine-tune, evaluate both, gate, sign, upload, start the rollout) "
          f"| {r['cycle_s']:.0f} s |")
    gate = cycle["gate"]
    if gate:
        held, trained = gate["held_out"]["false_alarms"], gate["trained"]["false_alarms"]
        print(f"| held-out false alarms above the threshold, fleet's model -> candidate | "
              f"{held['flagged_current']} -> {held['flagged_candidate']} of {held['n']} |")
        print(f"| trained-on false alarms above the threshold (not gated on) | {trained['flagged_current']} -> "
              f"{trained['flagged_candidate']} of {trained['n']} |")
        print(f"| held-out confirmed defects | {gate['held_out']['defects']['n']} |")
        print()
        print("| class | recall (test + held-out defects) | false-alarm rate, good test images | image AUROC |")
        print("|---|---|---|---|")
        for cls, both in gate["classes"].items():
            a, b = both["current"], both["candidate"]
            print(f"| {cls} | {_pct(a['recall'])} -> {_pct(b['recall'])} | {_pct(a['false_alarm_rate_test'])} -> "
                  f"{_pct(b['false_alarm_rate_test'])} | {_num(a['auroc'])} -> {_num(b['auroc'])} |")
    print()
    print(f"reason: {cycle['reason']}")
    if "rollout" not in r:
        return cycle["status"] in ("published", "refused")
    before, after = r["before"], r["after"]
    print()
    print(f"| the line (results of every agent) | on 2.0.0 | on {cycle['version']} | ratio |")
    print("|---|---|---|---|")
    print(f"| false-alarm rate on good images | {before['false_alarm_rate']:.1%} of {before['good']} | "
          f"{after['false_alarm_rate']:.1%} of {after['good']} | "
          f"{_ratio(after['false_alarm_rate'], before['false_alarm_rate'])} |")
    print(f"| recall on defect images | {before['recall']:.1%} of {before['defects']} | {after['recall']:.1%} of "
          f"{after['defects']} | {_ratio(after['recall'], before['recall'])} |")
    print(f"| rollout of the retrained model | {r['rollout'].state}, {r['running']} of {n} on it after "
          f"{r['rollout_s']:.1f} s | | |")
    return r["rollout"].state == "completed" and r["running"] == n


def _s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} s"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _ratio(a: float, b: float) -> str:
    return f"x{a / b:.2f}" if b else "n/a"


if __name__ == "__main__":
    sys.exit(main())
