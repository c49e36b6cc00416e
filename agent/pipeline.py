"""The station pipeline: capture -> fit to the model's input -> infer -> score/crops -> spool -> publish.

One thread per source captures and resizes each frame to the model's input
(stretched or letterboxed, as the package says); one thread runs inference in
batches; one scores, renders and spools; the publisher drains the spool. The
queues are bounded: when inference cannot keep up, capture drops frames (and
counts them); a result, once inferred, is never dropped. One stop event
serves every thread; `run` starts them in order and stops them in reverse.

A frame a source cannot use is counted (`frames_rejected` in the metrics) and
never stops the source. A source that stops with an error is opened again
with backoff for as long as the agent runs; while a source is failing, the
metrics message carries its error (`source_error`), which the hub shows as
the device's state. The message is sent at once when a source fails or recovers.

The model in use is one `ActiveModel` (package, runtime, scorer) read once
per batch: an over-the-air update (agent/updates.py) builds and self-tests
the new one aside and swaps the reference, so inference never waits on it
and every frame is scored by the model that inferred it.

The stages stay in one module, past the usual length: they share the queues,
the counters, the stop event and the active model, and the hand-offs between
them are what a reader needs to see together.
"""
from __future__ import annotations

import logging
import platform
import queue
import random
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from agent import __version__, health
from agent.config import AgentConfig, SourceConfig
from agent.publisher import Publisher
from agent.runtimes import Runtime, open_runtime
from agent.scoring import Scorer
from agent.updater import Updater, UpdateError
from agent.updates import UpdateWorker
from agent.sources import Frame, FolderSource, SourceError, SourceEvents, open_source, redact
from agent.spool import Spool, SpoolFull
from shared import messages, topics
from shared.ids import new_ulid
from shared.imaging import Placement, fit_square
from shared.manifest import Manifest
from shared.mqtt import MqttLink, NotConnected
from shared.package import Package, load_public_key
from shared.vocabulary import VERDICT_ANOMALY, VERDICT_OK

log = logging.getLogger(__name__)

_DONE = object()
LATENCY_WINDOW = 512
RESTART_FIRST_S = 1.0   # first wait before a source that stopped with an error is opened again
RESTART_MAX_S = 60.0    # longest wait between two attempts
STOP_PIPELINE_S = 10.0  # longest a stop waits for queued frames to be scored (a stream read times out in 5 s)


@dataclass(frozen=True, slots=True)
class ActiveModel:
    """The model the pipeline runs: swapped whole, never changed in place."""

    package: Package
    runtime: Runtime
    scorer: Scorer

    @property
    def manifest(self) -> Manifest:
        return self.package.manifest

    @property
    def size(self) -> int:
        return self.package.manifest.input_size

    @property
    def fitting(self) -> tuple[int, str]:
        """How a frame becomes this model's input: (square side, "stretch" or "letterbox")."""
        return self.size, self.package.manifest.resize

    def fit(self, image: np.ndarray) -> tuple[np.ndarray, Placement]:
        return fit_square(image, *self.fitting)


@dataclass(slots=True)
class Captured:
    image: np.ndarray       # the original frame, RGB
    boxed: np.ndarray       # the model's square input (shared.imaging.fit_square)
    fitting: tuple[int, str]   # the (side, resize mode) `boxed` was made for
    placement: Placement
    ts: float
    t0: float               # monotonic capture time, for latency
    name: str
    source: SourceConfig


class Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.captured = self.dropped = self.inferred = self.spooled = self.skipped = self.anomalies = 0
        self.rejected = 0   # frames or files a source could not use (never captured)
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


class _SourceMonitor(SourceEvents):
    """One source's events: its rejected frames counted, its error kept for the metrics message."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.error = ""

    def rejected(self, name: str, reason: str) -> None:
        self.agent.counters.add(rejected=1)

    def state(self, error: str) -> None:
        error = error[:messages.MAX_TEXT]
        if error != self.error:
            self.error = error
            self.agent.source_changed()


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
                             subscriptions=[(topics.topic(cfg.site, cfg.device, kind), 1)
                                            for kind in topics.DOWNSTREAM],
                             on_message=self._on_message)
        # delivery stops after everything else, so a stop (SIGTERM, Ctrl-C) still delivers what was made
        self._delivery_stop = threading.Event()
        d = cfg.delivery
        self.publisher = Publisher(self.spool, self.link, topics.topic(cfg.site, cfg.device, topics.RESULT),
                                   self._delivery_stop, window=d.window, resend_after_s=d.resend_after_s,
                                   receipt_window=d.receipt_window, receipt_timeout_s=d.receipt_timeout_s,
                                   receipt_timeout_max_s=d.receipt_timeout_max_s)
        self._normal_seen = 0
        self._threads: list[threading.Thread] = []
        self._sources_left = len(cfg.sources)
        self._monitors = [_SourceMonitor(self) for _ in cfg.sources]

    # -- the model --------------------------------------------------------------

    @property
    def package(self) -> Package:
        return self.active.package

    @property
    def manifest(self) -> Manifest:
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

    def build_runtime(self, model: bytes, manifest: Manifest) -> Runtime:
        """A runtime for a package this station can use; refuses one that lacks a source's class."""
        missing = [s.cls for s in self.cfg.sources if s.cls not in manifest.classes]
        if missing:
            raise UpdateError(f"source class(es) {missing} are not in model {manifest.model_id} "
                              f"{manifest.version} (it knows {list(manifest.classes)})")
        return open_runtime(self.cfg.runtime, model, manifest, threads=self.cfg.threads)

    def _scorer(self, manifest: Manifest) -> Scorer:
        return Scorer(manifest, self.cfg.thresholds, thumbnail_px=self.cfg.heatmap_size)

    def _swap(self, package: Package, runtime: Runtime) -> None:
        """Make a built, self-tested model the one the pipeline runs (update worker thread)."""
        old = self.active
        self.active = ActiveModel(package, runtime, self._scorer(package.manifest))
        log.info("now running %s %s (was %s)", package.manifest.model_id, package.version, old.package.version)
        try:
            self._birth()
        except NotConnected:
            pass   # the next connection's birth message carries it

    def _on_message(self, topic: str, payload: bytes) -> None:
        """The hub's messages to this device: receipts for its results, and its desired model."""
        try:
            if topics.parse(topic).kind == topics.RECEIPT:
                receipt = messages.decode(payload, expect=messages.Receipt)
                if receipt.device != self.cfg.device:
                    raise messages.MessageError(f"receipt names device {receipt.device!r}")
                self.publisher.on_receipt(receipt)
            else:
                self.updates.desired(messages.decode(payload, expect=messages.ModelDesired))
        except (messages.MessageError, topics.TopicError) as exc:
            log.error("ignored a malformed message on %s: %s", topic, exc)

    def _publish_state(self, state: messages.ModelState) -> None:
        topic = topics.topic(self.cfg.site, self.cfg.device, topics.MODEL_STATE)
        self.link.publish(topic, messages.encode(state), qos=1)

    # -- status -----------------------------------------------------------------

    def _status(self, online: bool) -> messages.Status:
        return messages.Status(
            device=self.cfg.device, online=online, ts=time.time(), site=self.cfg.site, station=self.cfg.station,
            version=__version__, model_id=self.manifest.model_id, model_version=self.manifest.version,
            runtime=self.runtime.name, hardware=f"{platform.machine()} {platform.node()}"[:120])

    def _birth(self) -> None:
        self.link.publish(self.status_topic, messages.encode(self._status(True)), qos=1, retain=True)
        self.updates.connected()

    def _on_published(self, mid: int) -> None:
        self.publisher.on_published(mid)

    # -- threads ----------------------------------------------------------------

    def _capture(self, index: int) -> None:
        """Run source `index` until its input ends or the agent stops, opening it again after an error."""
        src_cfg, monitor = self.cfg.sources[index], self._monitors[index]
        backoff = RESTART_FIRST_S
        try:
            while not self.stop.is_set():
                try:
                    source = open_source(src_cfg.uri, src_cfg.fps, self.stop, loop=src_cfg.loop,
                                         watch=src_cfg.watch, limits=self.cfg.image.limits(),
                                         rejected=src_cfg.rejected, events=monitor)
                    if isinstance(source, FolderSource) and source.watch:
                        monitor.state("")   # open, it works: new files may be a while coming
                    for frame in source.frames():
                        if monitor.error:
                            monitor.state("")
                            backoff = RESTART_FIRST_S
                        self._take(frame, src_cfg, source.live, monitor)
                    return   # its input has ended
                except Exception as exc:   # the source stops, never the station: reported, then opened again
                    bug = not isinstance(exc, SourceError)
                    why = f"source {redact(src_cfg.uri)}: {type(exc).__name__}: {exc}" if bug else str(exc)
                    log.error("%s; opening it again in %.1f s", why, backoff, exc_info=bug)
                    monitor.state(why)
                self.stop.wait(backoff * random.uniform(0.8, 1.2))   # jitter: sources failing together spread out
                backoff = min(backoff * 2, RESTART_MAX_S)
        finally:
            with self.counters.lock:
                self._sources_left -= 1
                last = self._sources_left == 0
            if last:
                self.frames.put(_DONE)

    def _take(self, frame: Frame, src_cfg: SourceConfig, live: bool, monitor: _SourceMonitor) -> None:
        """Fit a captured frame to the model's input and queue it for inference (a live source's is dropped
        when full)."""
        model = self.active
        try:
            boxed, placement = model.fit(frame.image)
        except Exception as exc:   # one frame OpenCV cannot resize: counted, the source goes on
            log.error("%s: frame cannot be resized to the model's input (%s); skipped", frame.name, exc)
            monitor.rejected(frame.name, str(exc))
            return
        item = Captured(frame.image, boxed, model.fitting, placement, frame.ts, time.monotonic(), frame.name,
                        src_cfg)
        self.counters.add(captured=1)
        if not live:
            self._put_waiting(item)
            return
        try:
            self.frames.put_nowait(item)
        except queue.Full:
            self.counters.add(dropped=1)  # overload: drop at capture, never later

    def source_error(self) -> str:
        """What the failing sources say, "" while every source works."""
        return "; ".join(m.error for m in self._monitors if m.error)[:messages.MAX_TEXT]

    def source_changed(self) -> None:
        """A source failed or recovered: tell the hub now rather than at the next metrics interval."""
        if not self.stop.is_set():   # stopping: the spool may be closing, and the last will says it all
            self._send_metrics()

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
                boxed = [b.boxed if b.fitting == model.fitting else model.fit(b.image)[0] for b in batch]
                maps = model.runtime.infer(np.stack(boxed), [b.source.cls for b in batch])
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
                payload, anomalous, rid = self._result(cap, amap, model)
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
                    self.spool.put(payload, anomalous, rid)
                    break
                except SpoolFull as exc:
                    log.error("%s; retrying in 5 s (the pipeline waits, nothing is discarded)", exc)
                    if self.stop.wait(5):
                        return
            self.counters.add(spooled=1)
            self.publisher.notify()

    def _result(self, cap: Captured, amap: np.ndarray, model: ActiveModel) -> tuple[bytes | None, bool, str]:
        """The encoded result of one frame, whether it is an anomaly, and its id (None: not published)."""
        cls = cap.source.cls
        if cap.fitting != model.fitting:   # fitted again for a model with another input
            _, placement = model.fit(cap.image)
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
                return None, False, ""
            with_frame = True  # a sampled normal frame: retraining material
        images = model.scorer.render(cap.image, scored, cls, placement, crops=scored.anomalous,
                                    with_frame=with_frame)
        result = messages.Result(
            id=new_ulid(), ts=cap.ts, site=self.cfg.site, device=self.cfg.device,
            station=cap.source.station or self.cfg.station, cls=cls, model_version=model.manifest.version,
            score=scored.score, norm_score=scored.norm_score, threshold=scored.threshold,
            verdict=VERDICT_ANOMALY if scored.anomalous else VERDICT_OK,
            latency_ms=latency, heatmap=images.heatmap, thumbnail=images.thumbnail, crops=images.crops,
            frame=images.frame, source=cap.name[-200:])
        return messages.encode(result), scored.anomalous, result.id

    def _metrics(self) -> None:
        while not self.stop.wait(self.cfg.metrics_interval_s):
            self._send_metrics()

    def _send_metrics(self) -> None:
        topic = topics.topic(self.cfg.site, self.cfg.device, topics.METRICS)
        try:
            self.link.publish(topic, messages.encode(self.metrics()), qos=0)
        except NotConnected:
            pass   # the next interval's message carries the news

    def metrics(self) -> messages.Metrics:
        c = self.counters
        with c.lock:
            now = time.monotonic()
            fps = c.window_frames / max(now - c.window_start, 1e-6)
            c.window_start, c.window_frames = now, 0
            lat = np.array(c.latency_ms) if c.latency_ms else np.zeros(1)
            infer = health.latency_percentiles(c.infer_ms)
            score = health.latency_percentiles(c.score_ms)
            dropped, rejected = c.dropped, c.rejected
        return messages.Metrics(
            device=self.cfg.device, ts=time.time(), fps=fps,
            latency_p50_ms=float(np.percentile(lat, 50)), latency_p95_ms=float(np.percentile(lat, 95)),
            frames_dropped=dropped, spool_depth=self.spool.depth(), pending_receipts=self.publisher.unconfirmed(),
            results_dropped=sum(self.spool.dropped().values()), cpu_percent=health.cpu_percent(),
            temperature_c=health.temperature(), infer_p50_ms=infer[0], infer_p95_ms=infer[1],
            score_p50_ms=score[0], score_p95_ms=score[1], gpu_percent=health.gpu_percent(),
            frames_rejected=rejected, source_error=self.source_error())

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> None:
        self.link.start()
        self.publisher.start()
        self.updates.start()
        workers = [("score", self._score), ("infer", self._infer), ("metrics", self._metrics)]
        workers += [(f"capture-{i}", lambda i=i: self._capture(i)) for i in range(len(self.cfg.sources))]
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
        """Stop capturing, let queued frames finish, try for `drain_s` to have the hub confirm them,
        then go offline.

        What the hub has not confirmed by then stays in the spool for the next start.
        """
        self.stop.set()
        finishing = time.monotonic() + STOP_PIPELINE_S
        for t in self._threads:   # the frames queued when the stop came are scored and spooled first
            if t.name != "metrics":
                t.join(max(0.0, finishing - time.monotonic()))
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
        log.info("agent %s/%s running %s (%s) with %s", self.cfg.site, self.cfg.device, self.manifest.model_id,
                 self.manifest.version, self.runtime.name)
        (log.info if self.cfg.trusted_keys else log.warning)("%s", self.cfg.package_policy())
        try:
            while not self.stop.is_set():
                if until_drained and self.drained():
                    break
                if self.link.fatal:   # bad credentials or TLS settings: waiting will not help
                    log.error("%s; stopping (the spool keeps what was made)", self.link.fatal)
                    break
                time.sleep(0.1)
        except KeyboardInterrupt:
            log.info("stopping")
        finally:
            self.shutdown()
