"""The station pipeline: capture -> letterbox -> infer -> score/crops -> spool -> publish.

One thread per source captures and letterboxes; one thread runs inference in
batches; one scores, renders and spools; the publisher drains the spool. The
queues are bounded: when inference cannot keep up, capture drops frames (and
counts them); a result, once inferred, is never dropped. One stop event
serves every thread; `run` starts them in order and stops them in reverse.

The model in use is one `ActiveModel` (package, runtime, scorer) read once
per batch: an over-the-air update (agent/updates.py) builds and self-tests
the new one aside and swaps the reference, so inference never waits on it
and every frame is scored by the model that inferred it.
"""
from __future__ import annotations

import logging
import platform
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent import __version__
from agent.config import AgentConfig, SourceConfig
from agent.publisher import Publisher
from agent.runtimes import Runtime, open_runtime
from agent.scoring import Scorer
from agent.updater import Updater, UpdateError
from agent.updates import UpdateWorker
from agent.sources import SourceError, open_source, redact
from agent.spool import Spool, SpoolFull
from shared import messages, topics
from shared.ids import new_ulid
from shared.imaging import Placement, letterbox
from shared.mqtt import MqttLink, NotConnected
from shared.package import Package, load_public_key

log = logging.getLogger(__name__)

_DONE = object()
LATENCY_WINDOW = 512


@dataclass(frozen=True, slots=True)
class ActiveModel:
    """The model the pipeline runs: swapped whole, never changed in place."""

    package: Package
    runtime: Runtime
    scorer: Scorer

    @property
    def manifest(self) -> dict:
        return self.package.manifest

    @property
    def size(self) -> int:
        return int(self.package.manifest["input_size"])


@dataclass(slots=True)
class Captured:
    image: np.ndarray       # the original frame, RGB
    boxed: np.ndarray       # letterboxed to the model input
    placement: Placement
    ts: float
    t0: float               # monotonic capture time, for latency
    name: str
    source: SourceConfig


class Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.captured = self.dropped = self.inferred = self.spooled = self.skipped = self.anomalies = 0
        self.latency_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.infer_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.infer_at: deque[float] = deque(maxlen=LATENCY_WINDOW)   # monotonic end of each batch
        self.score_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.window_start = time.monotonic()
        self.window_frames = 0

    def add(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        keys = [load_public_key(k) for k in cfg.trusted_keys]
        self.updater = Updater(cfg.models_dir(), keys, device=cfg.device, hub_url=cfg.update.hub_url,
                               token=cfg.update.hub_token, attempts=cfg.update.attempts, runtime=cfg.runtime,
                               allow_unsigned=cfg.allow_unsigned)
        installed = self.updater.current()   # a model the hub sent earlier wins over the configured one
        try:
            package = self.updater.read(installed.path if installed else cfg.package)
        except UpdateError as exc:
            raise ValueError(str(exc)) from None
        try:
            runtime = self.build_runtime(package.model, package.manifest)
        except UpdateError as exc:   # at start-up this is a configuration error
            raise ValueError(str(exc)) from None
        self.active = ActiveModel(package, runtime, self._scorer(package.manifest))
        self.spool = Spool(cfg.spool.path, cfg.spool.max_results, cfg.spool.max_bytes, cfg.spool.max_age_s)
        self.stop = threading.Event()
        self.counters = Counters()
        self.frames: queue.Queue = queue.Queue(maxsize=cfg.queue_size)
        self.inferred: queue.Queue = queue.Queue(maxsize=cfg.queue_size)
        self.status_topic = topics.topic(cfg.site, cfg.device, topics.STATUS)
        self.updates = UpdateWorker(self.updater, self.build_runtime, self._swap, self._publish_state, self.stop,
                                    current=lambda: self.active.package)
        self.link = MqttLink(cfg.broker_config(), f"kdfleet-agent-{cfg.site}-{cfg.device}",
                             will=(self.status_topic, messages.encode(self._status(False))),
                             on_connect=self._birth, on_published=self._on_published,
                             subscriptions=[(topics.topic(cfg.site, cfg.device, topics.MODEL_DESIRED), 1)],
                             on_message=self._on_desired)
        # delivery stops after everything else, so a stop (SIGTERM, Ctrl-C) still delivers what was made
        self._delivery_stop = threading.Event()
        self.publisher = Publisher(self.spool, self.link, topics.topic(cfg.site, cfg.device, topics.RESULT),
                                   self._delivery_stop)
        self._normal_seen = 0
        self._threads: list[threading.Thread] = []
        self._sources_left = len(cfg.sources)

    # -- the model --------------------------------------------------------------

    @property
    def package(self) -> Package:
        return self.active.package

    @property
    def manifest(self) -> dict:
        return self.active.manifest

    @property
    def size(self) -> int:
        return self.active.size

    @property
    def scorer(self) -> Scorer:
        return self.active.scorer

    @property
    def runtime(self) -> Runtime:
        return self.active.runtime

    @runtime.setter
    def runtime(self, runtime: Runtime) -> None:
        """Run the active package through another runtime (benchmarks compare runtimes this way)."""
        self.active = ActiveModel(self.active.package, runtime, self.active.scorer)

    def build_runtime(self, model: bytes, manifest: dict) -> Runtime:
        """A runtime for a package this station can use; refuses one that lacks a source's class."""
        missing = [s.cls for s in self.cfg.sources if s.cls not in manifest["classes"]]
        if missing:
            raise UpdateError(f"source class(es) {missing} are not in model {manifest['model_id']} "
                              f"{manifest['version']} (it knows {manifest['classes']})")
        return open_runtime(self.cfg.runtime, model, manifest, threads=self.cfg.threads)

    def _scorer(self, manifest: dict) -> Scorer:
        return Scorer(manifest, self.cfg.thresholds, thumbnail_px=self.cfg.heatmap_size)

    def _swap(self, package: Package, runtime: Runtime) -> None:
        """Make a built, self-tested model the one the pipeline runs (update worker thread)."""
        old = self.active
        self.active = ActiveModel(package, runtime, self._scorer(package.manifest))
        log.info("now running %s %s (was %s)", package.manifest["model_id"], package.version, old.package.version)
        try:
            self._birth()
        except NotConnected:
            pass   # the next connection's birth message carries it

    def _on_desired(self, topic: str, payload: bytes) -> None:
        try:
            self.updates.desired(messages.decode(payload, expect=messages.ModelDesired))
        except messages.MessageError as exc:
            log.error("ignored a malformed desired-model message on %s: %s", topic, exc)

    def _publish_state(self, state: messages.ModelState) -> None:
        topic = topics.topic(self.cfg.site, self.cfg.device, topics.MODEL_STATE)
        self.link.publish(topic, messages.encode(state), qos=1)

    # -- status -----------------------------------------------------------------

    def _status(self, online: bool) -> messages.Status:
        return messages.Status(
            device=self.cfg.device, online=online, ts=time.time(), site=self.cfg.site, station=self.cfg.station,
            version=__version__, model_id=self.manifest["model_id"], model_version=self.manifest["version"],
            runtime=self.runtime.name, hardware=f"{platform.machine()} {platform.node()}"[:120])

    def _birth(self) -> None:
        self.link.publish(self.status_topic, messages.encode(self._status(True)), qos=1, retain=True)
        self.updates.connected()

    def _on_published(self, mid: int) -> None:
        self.publisher.on_published(mid)

    # -- threads ----------------------------------------------------------------

    def _capture(self, src_cfg: SourceConfig) -> None:
        try:
            source = open_source(src_cfg.uri, src_cfg.fps, self.stop, loop=src_cfg.loop, watch=src_cfg.watch)
            for frame in source.frames():
                boxed, placement = letterbox(frame.image, self.size)
                item = Captured(frame.image, boxed, placement, frame.ts, time.monotonic(), frame.name, src_cfg)
                self.counters.add(captured=1)
                if not source.live:
                    self._put_waiting(item)
                    continue
                try:
                    self.frames.put_nowait(item)
                except queue.Full:
                    self.counters.add(dropped=1)  # overload: drop at capture, never later
            self.counters.add(skipped=source.errors)
        except SourceError as exc:
            log.error("source %s stopped: %s", redact(src_cfg.uri), exc)
        except Exception:
            log.exception("source %s failed", src_cfg.uri)
        finally:
            with self.counters.lock:
                self._sources_left -= 1
                last = self._sources_left == 0
            if last:
                self.frames.put(_DONE)

    def _put_waiting(self, item: Captured) -> None:
        while not self.stop.is_set():
            try:
                self.frames.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _infer(self) -> None:
        while True:
            item = self.frames.get()
            if item is _DONE:
                self.inferred.put(_DONE)
                return
            batch = [item]
            while len(batch) < self.cfg.batch_size:
                try:
                    nxt = self.frames.get_nowait()
                except queue.Empty:
                    break
                if nxt is _DONE:
                    self.frames.put(_DONE)
                    break
                batch.append(nxt)
            model = self.active   # one model per batch, whatever an update does meanwhile
            t = time.perf_counter()
            try:
                boxed = [b.boxed if b.boxed.shape[0] == model.size else letterbox(b.image, model.size)[0]
                         for b in batch]
                maps = model.runtime.infer(np.stack(boxed))
            except Exception:
                log.exception("inference failed on %d frame(s); skipped", len(batch))
                self.counters.add(skipped=len(batch))
                continue
            per = (time.perf_counter() - t) * 1000 / len(batch)
            with self.counters.lock:
                self.counters.infer_ms.extend([per] * len(batch))
                self.counters.infer_at.append(time.monotonic())
                self.counters.inferred += len(batch)
            for b, m in zip(batch, maps, strict=True):
                self.inferred.put((b, m, model))   # blocking: results are never dropped

    def _score(self) -> None:
        while True:
            item = self.inferred.get()
            if item is _DONE:
                return
            cap, amap, model = item
            t = time.perf_counter()
            try:
                payload, anomalous = self._result(cap, amap, model)
            except Exception:
                log.exception("scoring %s failed; skipped", cap.name)
                self.counters.add(skipped=1)
                continue
            with self.counters.lock:
                self.counters.score_ms.append((time.perf_counter() - t) * 1000)
            if payload is None:
                continue
            while True:
                try:
                    self.spool.put(payload, anomalous)
                    break
                except SpoolFull as exc:
                    log.error("%s; retrying in 5 s (the pipeline waits, nothing is discarded)", exc)
                    if self.stop.wait(5):
                        return
            self.counters.add(spooled=1)
            self.publisher.notify()

    def _result(self, cap: Captured, amap: np.ndarray, model: ActiveModel) -> tuple[bytes | None, bool]:
        cls = cap.source.cls
        if cap.boxed.shape[0] != model.size:   # letterboxed again for a model of another input size
            _, placement = letterbox(cap.image, model.size)
        else:
            placement = cap.placement
        scored = model.scorer.score(amap, cls, placement)   # the frame, not the letterbox border
        latency = (time.monotonic() - cap.t0) * 1000
        with self.counters.lock:
            self.counters.latency_ms.append(latency)
            self.counters.window_frames += 1
            self.counters.anomalies += int(scored.anomalous)
        policy = self.cfg.publish
        with_frame = False
        if not scored.anomalous and policy.policy != "all":
            self._normal_seen += 1
            if policy.policy == "anomalies" or self._normal_seen % policy.sample_every:
                return None, False
            with_frame = True  # a sampled normal frame: retraining material
        images = model.scorer.render(cap.image, scored, cls, placement, crops=scored.anomalous,
                                    with_frame=with_frame)
        result = messages.Result(
            id=new_ulid(), ts=cap.ts, site=self.cfg.site, device=self.cfg.device,
            station=cap.source.station or self.cfg.station, cls=cls, model_version=model.manifest["version"],
            score=scored.score, norm_score=scored.norm_score, threshold=scored.threshold,
            verdict=messages.VERDICT_ANOMALY if scored.anomalous else messages.VERDICT_OK,
            latency_ms=latency, heatmap=images.heatmap, thumbnail=images.thumbnail, crops=images.crops,
            frame=images.frame, source=cap.name[-200:])
        return messages.encode(result), scored.anomalous

    def _metrics(self) -> None:
        topic = topics.topic(self.cfg.site, self.cfg.device, topics.METRICS)
        while not self.stop.wait(self.cfg.metrics_interval_s):
            try:
                self.link.publish(topic, messages.encode(self.metrics()), qos=0)
            except NotConnected:
                pass

    def metrics(self) -> messages.Metrics:
        c = self.counters
        with c.lock:
            now = time.monotonic()
            fps = c.window_frames / max(now - c.window_start, 1e-6)
            c.window_start, c.window_frames = now, 0
            lat = np.array(c.latency_ms) if c.latency_ms else np.zeros(1)
            infer = latency_percentiles(c.infer_ms)
            score = latency_percentiles(c.score_ms)
            dropped = c.dropped
        return messages.Metrics(
            device=self.cfg.device, ts=time.time(), fps=fps,
            latency_p50_ms=float(np.percentile(lat, 50)), latency_p95_ms=float(np.percentile(lat, 95)),
            frames_dropped=dropped, spool_depth=self.spool.depth(),
            results_dropped=sum(self.spool.dropped().values()), cpu_percent=_cpu_percent(),
            temperature_c=_temperature(), infer_p50_ms=infer[0], infer_p95_ms=infer[1],
            score_p50_ms=score[0], score_p95_ms=score[1], gpu_percent=_gpu_percent())

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> None:
        self.link.start()
        self.publisher.start()
        self.updates.start()
        workers = [("score", self._score), ("infer", self._infer), ("metrics", self._metrics)]
        workers += [(f"capture-{i}", lambda s=s: self._capture(s)) for i, s in enumerate(self.cfg.sources)]
        for name, target in workers:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def sources_done(self) -> bool:
        """Every source has ended and every captured frame is scored and spooled."""
        return all(not t.is_alive() for t in self._threads if t.name != "metrics")

    def drained(self) -> bool:
        return self.sources_done() and self.spool.depth() == 0

    def shutdown(self, drain_s: float = 10.0) -> None:
        """Stop capturing, let queued frames finish, try for `drain_s` to deliver, then go offline.

        What is not delivered by then stays in the spool for the next start.
        """
        self.stop.set()
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline and not self.drained() and self.link.connected.is_set():
            time.sleep(0.05)
        self._delivery_stop.set()
        self.publisher.join(2)
        self.link.stop(final=(self.status_topic, messages.encode(self._status(False)), True))
        self.spool.close()

    def run(self, until_drained: bool = False) -> None:
        """Run until interrupted (or, with `until_drained`, until every source ended and all was delivered)."""
        self.start()
        log.info("agent %s/%s running %s (%s) with %s", self.cfg.site, self.cfg.device, self.manifest["model_id"],
                 self.manifest["version"], self.runtime.name)
        (log.info if self.cfg.trusted_keys else log.warning)("%s", self.cfg.package_policy())
        try:
            while not self.stop.is_set():
                if until_drained and self.drained():
                    break
                time.sleep(0.1)
        except KeyboardInterrupt:
            log.info("stopping")
        finally:
            self.shutdown()


def latency_percentiles(values: deque[float]) -> tuple[float, float]:
    """p50 and p95 of a latency window; -1 for an empty one."""
    if not values:
        return -1.0, -1.0
    a = np.array(values)
    return float(np.percentile(a, 50)), float(np.percentile(a, 95))


# Jetson boards report GPU load in tenths of a percent here
JETSON_GPU_LOAD = ("/sys/devices/gpu.0/load", "/sys/devices/platform/gpu.0/load",
                   "/sys/devices/platform/bus@0/17000000.gpu/load")


def _gpu_percent() -> float:
    """GPU load in percent where readable: Jetson sysfs, else NVML (nvidia-ml-py) if installed; -1 otherwise."""
    for path in JETSON_GPU_LOAD:
        try:
            return int(Path(path).read_text().strip()) / 10.0
        except (OSError, ValueError):
            continue
    try:
        import pynvml

        pynvml.nvmlInit()
        return float(pynvml.nvmlDeviceGetUtilizationRates(pynvml.nvmlDeviceGetHandleByIndex(0)).gpu)
    except Exception:   # no NVML library, no GPU, no driver: unknown
        return -1.0


def _cpu_percent() -> float:
    try:
        import psutil

        return float(psutil.cpu_percent(interval=None))
    except ImportError:
        return -1.0


def _temperature() -> float:
    """The hottest thermal zone (Jetsons and most PCs expose them), -1 when none is readable."""
    temps = []
    for zone in Path("/sys/class/thermal").glob("thermal_zone*/temp"):
        try:
            temps.append(int(zone.read_text().strip()) / 1000.0)
        except (OSError, ValueError):
            continue
    return max(temps) if temps else -1.0
