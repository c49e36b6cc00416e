"""The agent on a folder, publishing to a real broker."""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from agent.config import load
from agent.health import latency_percentiles
from agent.pipeline import Agent
from shared import messages, topics
from shared.config import BrokerConfig
from shared.imaging import letterbox, read_image
from shared.mqtt import MqttLink
from shared.package import read_package
from shared.scoring import image_score


class Collector:
    """Subscribes to one device's results and keeps them by id (QoS 1 may deliver twice); confirms
    each with a receipt, as the hub does once it has stored it."""

    def __init__(self, broker: tuple[str, int], site: str, device: str, client_id: str, persistent: bool = False):
        self.results: dict[str, messages.Result] = {}
        self.deliveries = 0
        self.lock = threading.Lock()
        self.receipt_topic = topics.topic(site, device, topics.RECEIPT)
        self.device = device
        self.link = MqttLink(BrokerConfig(*broker), client_id, clean_start=not persistent,
                             subscriptions=[(topics.topic(site, device, topics.RESULT), 1)],
                             on_message=self.on_message)
        self.link.start()   # assigned first: a persistent session's results arrive at once, and are confirmed on it
        assert self.link.wait_connected(10) and self.link.subscribed.wait(10)

    def on_message(self, topic: str, payload: bytes) -> None:
        r = messages.decode(payload, expect=messages.Result)
        with self.lock:
            self.deliveries += 1
            self.results[r.id] = r
        receipt = messages.Receipt(device=self.device, ts=time.time(), ids=(r.id,))
        self.link.publish(self.receipt_topic, messages.encode(receipt), qos=1)

    def wait(self, n: int, timeout: float) -> bool:
        """True once `n` distinct results have arrived."""
        return self.wait_until(lambda ids: len(ids) >= n, timeout)

    def wait_until(self, done: Callable[[set[str]], bool], timeout: float) -> bool:
        """True once `done(ids of the results so far)` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if done(set(self.results)):
                    return True
            time.sleep(0.05)
        return False


def agent_config(tmp_path, package, broker, site, folder, **extra):
    return load(None, {"device": "cam-1", "site": site, "station": "line-a", "package": str(package),
                       "broker": f"mqtt://{broker[0]}:{broker[1]}", "runtime": "onnxruntime", "threads": 1,
                       "sources": [{"uri": str(folder), "cls": "plate", **extra}],
                       "spool": {"path": str(tmp_path / "spool.db")}, "metrics_interval_s": 0.5,
                       "allow_unsigned": True})


def test_one_result_per_image_with_the_runtime_s_scores(tmp_path, tiny_package, plates, broker, unique):
    folder, truth = plates(12, corrupt=1)
    site = f"agent-{unique}"
    sub = Collector(broker, site, "cam-1", f"sub-{unique}")
    agent = Agent(agent_config(tmp_path, tiny_package, broker, site, folder))
    agent.run(until_drained=True)
    assert sub.wait(len(truth), 15), f"only {len(sub.results)} of {len(truth)} results arrived"
    sub.link.stop()
    by_name = {r.source: r for r in sub.results.values()}
    assert sorted(by_name) == sorted(truth)          # the truncated file was skipped, the rest all came
    pkg = read_package(tiny_package)
    sess = ort.InferenceSession(pkg.model, providers=["CPUExecutionProvider"])
    for name, spot in truth.items():
        r = by_name[name]
        boxed, placement = letterbox(read_image(folder / name), pkg.manifest.input_size)
        expected = image_score(sess.run(None, {"image": boxed[None]})[0][0, 0], pkg.manifest.sigma,
                               placement, pkg.manifest.input_size)
        assert r.score == expected                   # bit for bit: same runtime, same scoring code
        assert r.verdict == ("anomaly" if spot else "ok"), (name, r.score)
        assert (len(r.crops) > 0) == spot
        for c in r.crops:
            crop = cv2.imdecode(np.frombuffer(c.jpeg, np.uint8), cv2.IMREAD_COLOR)
            assert crop is not None and c.x + c.w <= 64 and c.y + c.h <= 48
        assert cv2.imdecode(np.frombuffer(r.heatmap, np.uint8), cv2.IMREAD_COLOR) is not None
    assert agent.counters.rejected == 1 and agent.counters.skipped == 0
    c = agent.counters   # per stage: what the metrics message reports as p50 / p95
    assert len(c.score_ms) == len(truth) and len(c.infer_ms) == len(truth)
    infer, score = latency_percentiles(c.infer_ms), latency_percentiles(c.score_ms)
    assert 0 < infer[0] <= infer[1] and 0 < score[0] <= score[1]
    assert np.median(c.latency_ms) >= infer[0] + score[0]   # the whole pipeline takes longer than its stages
    assert latency_percentiles(deque()) == (-1.0, -1.0)


def test_live_source_drops_frames_at_capture_never_results(tmp_path, tiny_package, plates, broker, unique):
    folder, truth = plates(30)
    site = f"agent-{unique}"
    sub = Collector(broker, site, "cam-1", f"sub-{unique}")
    cfg = agent_config(tmp_path, tiny_package, broker, site, folder, fps=2000.0)
    agent = Agent(cfg)
    slow = agent.runtime.infer

    def slow_infer(batch, classes=None):   # a runtime slower than the camera
        time.sleep(0.02)
        return slow(batch, classes)

    agent.runtime.infer = slow_infer
    agent.run(until_drained=True)
    c = agent.counters
    assert c.dropped > 0 and c.captured == len(truth)
    assert sub.wait(c.captured - c.dropped, 15)
    assert len(sub.results) == c.captured - c.dropped == c.spooled
    sub.link.stop()


def test_a_source_class_the_model_does_not_know_is_refused_at_start(tmp_path, tiny_package, plates, unique):
    folder, _ = plates(1)
    cfg = load(None, {"device": "cam-1", "site": f"agent-{unique}", "package": str(tiny_package),
                      "runtime": "onnxruntime", "update": {"models_dir": str(tmp_path / "models")},
                      "sources": [{"uri": str(folder), "cls": "bottle"}], "allow_unsigned": True})
    with pytest.raises(ValueError, match=r"source class\(es\) \['bottle'\] are not in model darkness"):
        Agent(cfg)
