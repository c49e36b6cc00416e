"""Agent benchmark: a folder of JPEGs through the whole station pipeline into a real broker.

    python -m bench.agent                               # quick STFPM FP32 package at 128 px (trained once)
    python -m bench.agent --size 256 --precision int8   # the target case: STFPM INT8 at 256 px
    python -m bench.agent --package model.kdpkg --folder frames/ --cls screw [--checkpoint best.pt]
    kdfleet agent bench ...                             # the same

Each run is `agent.pipeline.Agent` as `kdfleet agent run` builds it: folder capture (JPEG decode,
letterbox) -> ONNX Runtime -> scoring, heat map, crops -> SQLite spool (synchronous=FULL) -> MQTT
QoS 1, a result leaving the spool on the receipt a consumer process sends back for each batch, as
the hub does after its commit. The broker is the local Mosquitto on 127.0.0.1:1883 when it answers,
else a private one. The folder is read as fast as possible (the source waits for the pipeline,
nothing is dropped); frames/s = frames delivered / (start to the last receipt).

The baseline is the same pipeline and model with inference in PyTorch FP32 eager (the training
checkpoint wrapped in `trainer.inference_graph.InferenceGraph`), timed in the same run; it needs
torch and trainer, and a checkpoint (built here, or --checkpoint). Each run is its own process, so
peak RSS (VmHWM) is that run's alone (the baseline's also holds the ONNX Runtime session the agent
opened before its runtime was swapped: tens of MB). Pipeline latencies are the agent's own counters (the last
512 frames); capture-to-scored latency includes the time a frame waits in the bounded queues. CPU
cores is the run's CPU time over its wall time: on a shared machine it shows how much of the CPU the
run got, and frames/CPU-s is the rate per core it would sustain. The stage table times each step
alone, one frame at a time on one thread, to show where the time goes.

Targets (issue "The edge agent"): STFPM INT8 at 256 px >= 150 frames/s end to end and peak RSS
<= 400 MB on a 2-core CPU.

One module past the usual length: a benchmark is read as a whole, from the packages it builds to
the table it prints, and nothing else imports its parts.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypeVar

import numpy as np


TARGET_FPS = 150.0
TARGET_RSS_MB = 400.0
WORK = Path("var/bench/agent")
STAGE_FRAMES = 60          # frames timed stage by stage after each pipeline run
T = TypeVar("T")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class RunSpec:
    """One measured pipeline run (picklable: it crosses into a fresh process)."""

    label: str
    package: str
    folder: str
    cls: str
    broker: str
    threads: int
    batch_size: int
    queue_size: int
    torch_checkpoint: str | None = None   # set: inference in PyTorch FP32 eager instead of the package's graph
    timeout_s: float = 600.0


# -- models and frames ----------------------------------------------------------------


def ensure_models(work: Path, size: int, epochs: int, precision: str, threads: int) -> tuple[Path, Path, Path]:
    """(package, checkpoint, data): a quick unified STFPM on the synthetic set, INT8 by PTQ on request."""
    from bench.quantization import ensure_data
    from trainer.export import quick_package

    data = ensure_data(work / f"synth-{size}", size, seed=0)
    models = work / "models"
    log(f"STFPM at {size} px, {epochs} epochs: training unless cached in {models}")
    package = quick_package(data, models, progress=_train_progress, size=size, epochs=epochs)
    info = json.loads(package.with_suffix(".json").read_text())
    checkpoint = Path(info["config"]["out"]) / "best.pt"
    log(f"FP32 package {package}")
    if precision == "int8":
        package = ensure_int8(package, checkpoint, data, models / f"{package.stem}-int8", threads)
    return package, checkpoint, data


def _train_progress(p: Any) -> None:
    if p.val_loss is not None:
        log(f"epoch {p.epoch}/{p.epochs}: loss {p.loss:.4f}, val {p.val_loss:.4f}, {p.eta_s:.0f} s left")
        if p.epoch == p.epochs:
            log("exporting to ONNX and evaluating through ONNX Runtime for the package's calibration")


def ensure_int8(fp32_package: Path, checkpoint: Path, data: Path, folder: Path, threads: int) -> Path:
    """Static INT8 (QDQ, per-channel, calibrated on 32 training frames) packaged with its own calibration."""
    from shared.package import read_package
    from trainer.quantize import Recipe
    from trainer.quantize.calibration import DataSpec, calibration_images
    from trainer.quantize.ptq import quantize_ptq
    from trainer.quantize.report import METRICS, ReportConfig, Variant, evaluate_variant, package_variant
    from trainer.checkpoint import load_checkpoint

    out = folder / "ptq_train.kdpkg"
    if out.exists():
        log(f"INT8 package {out} (cached)")
        return out
    folder.mkdir(parents=True, exist_ok=True)
    tcfg, _, _ = load_checkpoint(checkpoint)
    fp32_read = read_package(fp32_package)
    fp32 = folder / "fp32.onnx"
    fp32.write_bytes(fp32_read.model)
    # the FP32 package's own evaluation (same data, same split) is the reference the INT8 drop is measured against
    reference = Variant(Recipe("fp32"), fp32_package, {},
                        metrics={k: fp32_read.manifest.metrics["mean"][k] for k in METRICS})
    spec = DataSpec.of(tcfg, data)
    log("INT8: calibrating on 32 training frames and quantising")
    res = quantize_ptq(fp32, folder / "ptq_train.onnx", calibration_images("train", spec, 32))
    variant = Variant(Recipe("ptq", "train"), res.path, {**res.recipe(), "calibration": "train"})
    log("INT8: evaluating through ONNX Runtime for the package's thresholds")
    variant.evaluation = evaluate_variant(res.path, str(data), list(tcfg.classes), tcfg.size, tcfg.val_fraction,
                                          tcfg.seed, None, threads, tcfg.resize)
    variant.metrics = {k: variant.evaluation["mean"][k] for k in METRICS}
    cfg = ReportConfig(checkpoint=str(checkpoint), out=str(folder), data=str(data))
    path = package_variant(variant, tcfg, cfg, folder, reference)
    fp32.unlink()
    log(f"INT8 package {path}")
    return path


def ensure_frames(data: Path, cls: str, n: int, work: Path) -> Path:
    """`n` JPEGs (quality 90) cycling through the synthetic test images of `cls`, good and defective."""
    import cv2

    folder = work / f"frames-{data.name}-{cls}-{n}"
    if len(list(folder.glob("*.jpg"))) == n:
        return folder
    sources = sorted((data / cls / "test").rglob("*.png"))
    if not sources:
        raise SystemExit(f"bench.agent: no test images of class {cls!r} under {data}; pick --cls from the model")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    images = [cv2.imread(str(p)) for p in sources]
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:05d}.jpg"), images[i % len(images)], [cv2.IMWRITE_JPEG_QUALITY, 90])
    log(f"{n} JPEG frames of {cls} in {folder}")
    return folder


# -- one run (in its own process) ------------------------------------------------------


class TorchEager:
    """PyTorch FP32 eager inference on the training checkpoint: the runtime the baseline swaps in."""

    name = "pytorch-fp32-eager"

    def __init__(self, checkpoint: str, threads: int) -> None:
        import torch

        from trainer.inference_graph import InferenceGraph
        from trainer.checkpoint import load_checkpoint

        torch.set_num_threads(threads or os.cpu_count() or 1)
        cfg, model, _ = load_checkpoint(checkpoint)
        self.torch = torch
        self.graph = InferenceGraph(model).eval()
        self.classes = list(cfg.classes)

    def infer(self, batch: np.ndarray, classes: list[str] | None = None) -> np.ndarray:
        """(N, S, S, 3) uint8 [, class names] -> (N, m, m) float32, as the agent's runtimes return it."""
        frames = self.torch.from_numpy(np.ascontiguousarray(batch, dtype=np.uint8))
        with self.torch.inference_mode():
            if self.graph.class_conditional:
                names = list(classes or []) * len(batch) if len(classes or []) == 1 else list(classes or [])
                index = self.torch.tensor([self.classes.index(c) for c in names], dtype=self.torch.int32)
                out = self.graph(frames, index)                                               # (N, 1, m, m)
            else:
                out = self.graph(frames)
        return out[:, 0].numpy()


def measure(spec: RunSpec) -> dict[str, Any]:
    """Run the agent over the folder until every result is confirmed; counters, rates and peak RSS."""
    import logging

    from agent.config import load
    from agent.pipeline import Agent

    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="kdfleet-bench-agent-"))
    consumer: subprocess.Popen | None = None
    try:
        cfg = load(None, {
            "package": spec.package, "broker": spec.broker, "site": "bench", "device": f"bench-{spec.label}",
            "threads": spec.threads, "batch_size": spec.batch_size, "queue_size": spec.queue_size,
            "runtime": "onnxruntime", "spool": {"path": str(tmp / "spool.db")},
            "update": {"models_dir": str(tmp / "models")},   # never a model installed by an earlier agent
            "allow_unsigned": True,   # the benchmark measures packages as trained, signed or not
            "sources": [{"uri": spec.folder, "cls": spec.cls}]}, environ={})
        agent = Agent(cfg)
        if spec.torch_checkpoint:
            agent.runtime = TorchEager(spec.torch_checkpoint, spec.threads)
        size = agent.size
        blank = np.zeros((spec.batch_size, size, size, 3), np.uint8)
        # first calls allocate and plan: not what a station does all day
        _in_thread(lambda: [agent.runtime.infer(blank, [spec.cls]) for _ in range(3)])
        n = len(_images(spec.folder))
        consumer = _consumer(spec.broker, "bench", f"bench-{spec.label}")
        cpu0, t0 = _cpu_s(), time.perf_counter()
        agent.start()
        if not agent.link.wait_connected(10):
            raise RuntimeError(f"broker {spec.broker} did not accept the agent's connection in 10 s")
        t_spooled = None
        deadline = t0 + spec.timeout_s
        while not agent.drained():
            if t_spooled is None and agent.sources_done():
                t_spooled = time.perf_counter()
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{spec.label}: not drained within {spec.timeout_s:.0f} s")
            time.sleep(0.005)
        t1 = time.perf_counter()
        cpu = _cpu_s() - cpu0
        rss_mb = peak_rss_mb()
        c = agent.counters
        stages = {k: _pcts(v) for k, v in vars(c).items() if k.endswith("_ms") and isinstance(v, deque) and v}
        out = {
            "label": spec.label, "runtime": agent.runtime.name, "model_id": agent.manifest.model_id,
            "precision": agent.manifest.precision, "size": size, "frames": n, "captured": c.captured,
            "spooled": c.spooled, "skipped": c.skipped, "dropped": c.dropped, "anomalies": c.anomalies,
            "fps": c.spooled / (t1 - t0), "fps_spooled": c.spooled / ((t_spooled or t1) - t0),
            "seconds": t1 - t0, "cpu_cores": cpu / (t1 - t0), "peak_rss_mb": rss_mb, "pipeline": stages,
        }
        agent.shutdown(drain_s=0)
        out["stages"] = _in_thread(lambda: stage_times(agent, spec, tmp))
        return out
    finally:
        if consumer is not None:
            consumer.terminate()
            consumer.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


CONSUMER = """
import sys, threading, time
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from shared import messages, topics
host, port, site, device = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ids, lock = [], threading.Lock()
c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
c.on_connect = lambda c, u, f, rc, p: c.subscribe(topics.topic(site, device, topics.RESULT), qos=1)
c.on_subscribe = lambda *a: print("subscribed", flush=True)

def take(client, userdata, message):
    with lock:
        ids.append(messages.decode(message.payload, expect=messages.Result).id)

def confirm():   # a receipt per batch, as the hub sends one per commit
    while True:
        time.sleep(0.02)
        with lock:
            batch = ids[:messages.MAX_RECEIPT_IDS]
            del ids[:len(batch)]
        if batch:
            receipt = messages.Receipt(device=device, ts=time.time(), ids=tuple(batch))
            c.publish(topics.topic(site, device, topics.RECEIPT), messages.encode(receipt), qos=1)

c.on_message = take
threading.Thread(target=confirm, daemon=True).start()
c.connect(host, port)
c.loop_forever()
"""


def _consumer(broker: str, site: str, device: str) -> subprocess.Popen:
    """The results' reader, in its own process as the hub would be: it confirms what it takes with a
    receipt per batch (a broker acknowledges a result that no subscription matches with "no matching
    subscribers", and the agent keeps such results)."""
    from shared.config import BrokerConfig

    b = BrokerConfig.from_url(broker)
    proc = subprocess.Popen([sys.executable, "-c", CONSUMER, b.host, str(b.port), site, device],
                            stdout=subprocess.PIPE, text=True)
    if proc.stdout is None or proc.stdout.readline().strip() != "subscribed":
        proc.kill()
        raise RuntimeError(f"could not subscribe to {device}'s results on {broker}")
    return proc


def stage_times(agent: Any, spec: RunSpec, tmp: Path) -> dict[str, dict[str, float]]:
    """Each pipeline step alone, one frame at a time: where a frame's time goes (ms p50/p95)."""
    from agent.spool import Spool
    from shared import messages
    from shared.ids import new_ulid
    from shared.imaging import letterbox, read_image
    from shared.vocabulary import VERDICT_ANOMALY, VERDICT_OK

    spool = Spool(tmp / "stages.db")
    times: dict[str, list[float]] = {k: [] for k in ("decode", "letterbox", "infer", "score", "render",
                                                     "encode", "spool")}
    paths = _images(spec.folder)[:STAGE_FRAMES]

    def timed(stage: str, fn: Any, *a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        r = fn(*a, **kw)
        times[stage].append((time.perf_counter() - t) * 1000)
        return r

    for path in paths:
        image = timed("decode", read_image, path)
        boxed, placement = timed("letterbox", letterbox, image, agent.size)
        amap = timed("infer", agent.runtime.infer, boxed[None], [spec.cls])[0]
        scored = timed("score", agent.scorer.score, amap, spec.cls)
        images = timed("render", agent.scorer.render, image, scored, spec.cls, placement, crops=scored.anomalous,
                       with_frame=False)
        payload = timed("encode", messages.encode, messages.Result(
            id=new_ulid(), ts=time.time(), site="bench", device="bench", station="bench", cls=spec.cls,
            model_version="0", score=scored.score, norm_score=scored.norm_score, threshold=scored.threshold,
            verdict=VERDICT_ANOMALY if scored.anomalous else VERDICT_OK, latency_ms=1.0,
            heatmap=images.heatmap, thumbnail=images.thumbnail, crops=images.crops, frame=images.frame,
            source=path.name))
        timed("spool", spool.put, payload, scored.anomalous, new_ulid())
    spool.close()
    return {k: _pcts(v) for k, v in times.items()}


def _in_thread(fn: Callable[[], T]) -> T:
    """`fn()` on a fresh worker thread, where the agent infers: on this loaded 2-core machine PyTorch
    ran 17-120x slower on the main thread than on a worker thread (OpenMP teams contending)."""
    box: list[Any] = []
    worker = threading.Thread(target=lambda: box.append(fn()))
    worker.start()
    worker.join()
    if not box:
        raise RuntimeError("the benchmark's worker thread failed (its traceback is above)")
    return box[0]


def _images(folder: str) -> list[Path]:
    """The images a folder source reads, in its order."""
    from agent.sources import IMAGE_SUFFIXES

    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _pcts(values: Any) -> dict[str, float]:
    a = np.asarray(list(values), dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)), "mean": float(a.mean())}


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not getrusage: a spawned child's ru_maxrss starts
    at its parent's peak (Linux carries it across fork and exec), which would charge each run with
    the models trained before it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_isolated(spec: RunSpec) -> dict[str, Any]:
    """`measure` in a fresh process, so imports and peak RSS are that run's alone."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(measure, spec).result()


# -- broker and report -----------------------------------------------------------------


def broker_url(stack: ExitStack, work: Path) -> str:
    """The local Mosquitto when it answers on 1883, else a private one for this run."""
    try:
        socket.create_connection(("127.0.0.1", 1883), 0.3).close()
        return "mqtt://127.0.0.1:1883"
    except OSError:
        from bench.hub import mosquitto

        return stack.enter_context(mosquitto(work))


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = [title, line, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), line]
    out += ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                                                strict=True)))
            for r in rows]
    return "\n".join([*out, line])


def report(runs: list[dict[str, Any]], broker: str) -> str:
    """The summary, the per-stage tables and the targets, as printed."""
    head = runs[0]
    one, five, _ = os.getloadavg()
    lines = [f"agent bench: {head['model_id']} ({head['precision']}, {head['size']} px), {head['frames']} JPEG "
             f"frames, broker {broker}",
             f"machine: {os.cpu_count()} CPUs, load average {one:.2f} (1 min) {five:.2f} (5 min)", ""]
    rows = []
    for r in runs:
        p = r["pipeline"]
        rows.append([r["label"], r["runtime"], f"{r['fps']:.1f}", f"{r['fps_spooled']:.1f}",
                     *_ms(p.get("infer_ms")), *_ms(p.get("latency_ms")), f"{r['peak_rss_mb']:.0f}",
                     f"{r['cpu_cores']:.2f}", f"{r['fps'] / r['cpu_cores']:.0f}", f"{r['spooled']}/{r['frames']}",
                     str(r["anomalies"])])
    if len(runs) == 2:
        a, b = runs
        pa, pb = a["pipeline"], b["pipeline"]
        rows.append(["ratio", "agent / baseline", f"{a['fps'] / b['fps']:.2f}x",
                     f"{a['fps_spooled'] / b['fps_spooled']:.2f}x",
                     *(_ratio(pa.get("infer_ms"), pb.get("infer_ms"), k) for k in ("p50", "p95")),
                     *(_ratio(pa.get("latency_ms"), pb.get("latency_ms"), k) for k in ("p50", "p95")),
                     f"{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x", "",
                     f"{(a['fps'] / a['cpu_cores']) / (b['fps'] / b['cpu_cores']):.2f}x", "", ""])
    lines.append(table("end to end (frames/s to the last receipt; pipeline latencies from the agent's counters)",
                       ["run", "runtime", "frames/s", "spooled/s", "infer p50", "infer p95", "capture->scored p50",
                        "p95", "peak RSS MB", "CPU cores", "frames/CPU-s", "delivered", "anomalies"], rows))
    stage_rows = []
    for stage in runs[0]["stages"]:
        row = [stage]
        for r in runs:
            s = r["stages"][stage]
            total = sum(v["mean"] for v in r["stages"].values())
            row += [f"{s['p50']:.2f}", f"{s['p95']:.2f}", f"{100 * s['mean'] / total:.0f} %"]
        stage_rows.append(row)
    header = ["stage"] + [f"{r['label']} {k}" for r in runs for k in ("p50 ms", "p95 ms", "share")]
    lines += ["", table(f"stages alone, one frame at a time ({STAGE_FRAMES} frames, ms)", header, stage_rows)]
    agent = runs[0]
    lines += ["", "targets (issue: STFPM INT8 at 256 px on a 2-core CPU):",
              f"  >= {TARGET_FPS:.0f} frames/s end to end: {agent['fps']:.1f} "
              f"{'met' if agent['fps'] >= TARGET_FPS else 'MISSED'}",
              f"  peak RSS <= {TARGET_RSS_MB:.0f} MB: {agent['peak_rss_mb']:.0f} MB "
              f"{'met' if agent['peak_rss_mb'] <= TARGET_RSS_MB else 'MISSED'}"]
    if (agent["precision"], agent["size"]) != ("int8", 256):
        lines.append(f"  (this run is {agent['precision']} at {agent['size']} px: the targets are stated for "
                     "int8 at 256 px)")
    return "\n".join(lines)


def _ms(p: dict[str, float] | None) -> list[str]:
    return [f"{p['p50']:.2f}", f"{p['p95']:.2f}"] if p else ["-", "-"]


def _ratio(a: dict[str, float] | None, b: dict[str, float] | None, key: str) -> str:
    return f"{a[key] / b[key]:.2f}x" if a and b and b[key] > 0 else "-"


# -- command line -----------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdfleet agent bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--package", help="model package to run (default: a quick STFPM built here)")
    p.add_argument("--checkpoint", help="training checkpoint of --package, for the PyTorch baseline")
    p.add_argument("--folder", help="folder of JPEGs to stream (default: synthetic test images of --cls)")
    p.add_argument("--cls", help="class the frames show (default: screw when the model has it, else its first)")
    p.add_argument("--size", type=int, default=128, help="input side of the model built here (default 128)")
    p.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                   help="of the model built here; int8: static PTQ (default fp32)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs of the model built here (default 8)")
    p.add_argument("--frames", type=int, default=1500, help="JPEG frames made when --folder is absent")
    p.add_argument("--threads", type=int, default=0, help="inference threads (default 0: one per core)")
    p.add_argument("--batch-size", type=int, default=1, help="frames per inference call (default 1)")
    p.add_argument("--queue-size", type=int, default=8, help="frames queued before inference (default 8)")
    p.add_argument("--no-baseline", action="store_true", help="skip the PyTorch FP32 eager run")
    p.add_argument("--work", type=Path, default=WORK, help=f"cache of data, models and frames (default {WORK})")
    p.add_argument("--json", type=Path, help="also write the measurements here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    data: Path | None = None
    if args.package:
        package = Path(args.package)
        if not package.is_file():
            print(f"bench.agent: package {package} not found", file=sys.stderr)
            return 2
    else:
        try:
            package, checkpoint, data = ensure_models(work, args.size, args.epochs, args.precision, args.threads)
        except ImportError as exc:
            print(f"bench.agent: building a model needs the trainer ({exc}); pip install -e '.[trainer]' "
                  "or pass --package", file=sys.stderr)
            return 2
    from shared.package import read_package

    classes = list(read_package(package).manifest.classes)
    cls = args.cls or ("screw" if "screw" in classes else classes[0])
    if cls not in classes:
        print(f"bench.agent: class {cls!r} is not in the model ({', '.join(classes)})", file=sys.stderr)
        return 2
    if args.folder:
        folder = Path(args.folder)
    elif data is not None:
        folder = ensure_frames(data, cls, args.frames, work)
    else:
        print("bench.agent: with --package, give --folder (JPEGs of --cls)", file=sys.stderr)
        return 2
    baseline = None if args.no_baseline else _baseline_checkpoint(checkpoint)
    with ExitStack() as stack:
        broker = broker_url(stack, work)
        common = dict(package=str(package), folder=str(folder), cls=cls, broker=broker, threads=args.threads,
                      batch_size=args.batch_size, queue_size=args.queue_size)
        log(f"agent run: {package.name} over {folder} into {broker}")
        runs = [run_isolated(RunSpec(label="agent", **common))]
        if baseline:
            log("baseline run: the same pipeline with PyTorch FP32 eager inference")
            runs.append(run_isolated(RunSpec(label="torch", torch_checkpoint=str(baseline), **common)))
    print(report(runs, broker))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "broker": broker, "loadavg": os.getloadavg(),
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))
    return 0


def _baseline_checkpoint(checkpoint: Path | None) -> Path | None:
    if checkpoint is None:
        log("no baseline: the PyTorch run needs the package's checkpoint (--checkpoint)")
        return None
    try:
        import torch  # noqa: F401

        import trainer.checkpoint  # noqa: F401
    except ImportError as exc:
        log(f"no baseline: {exc}")
        return None
    return checkpoint


if __name__ == "__main__":
    sys.exit(main())
