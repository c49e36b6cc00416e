"""One bad image or one failing source never stops a station: hostile files beside good ones, a
restart over the same folder, and a source that fails, is reported and comes back."""
from __future__ import annotations

import logging
import threading

from agent import pipeline
from agent.config import load
from agent.pipeline import Agent
from shared import messages, topics
from shared.config import BrokerConfig
from shared.mqtt import MqttLink
from tests.agent.test_pipeline import Collector, agent_config
from tests.hostile_images import add_hostile_files, png_claiming
from tests.waiting import wait_for


def test_hostile_images_are_moved_aside_and_counted_while_the_good_ones_are_inspected(
        tmp_path, tiny_package, plates, broker, unique, huge_png):
    folder, truth = plates(6)
    bad = add_hostile_files(folder, huge_png)
    site = f"agent-{unique}"
    sub = Collector(broker, site, "cam-1", f"sub-{unique}")
    cfg = agent_config(tmp_path, tiny_package, broker, site, folder)
    agent = Agent(cfg)
    agent.start()
    try:
        wait_for(agent.drained, timeout=20, what="every good image inspected and delivered")
        assert agent.counters.rejected == len(bad)
        reported = agent.metrics()   # what the next metrics message says
        assert reported.frames_rejected == len(bad)
        assert reported.source_error == ""   # a bad file is the file's fault, not the source's
    finally:
        agent.shutdown()
    assert sub.wait(len(truth), 15), f"only {len(sub.results)} of {len(truth)} results arrived"
    assert sorted(r.source for r in sub.results.values()) == sorted(truth)
    assert sorted(p.name for p in (folder / "rejected").iterdir()) == sorted(bad)

    # a restart over the same folder: the files set aside are not met again; a new bad one is
    (folder / "0002a-bomb.png").write_bytes(png_claiming(60_000, 60_000))
    again = Agent(cfg)
    again.run(until_drained=True)
    assert sub.wait(2 * len(truth), 15)
    sub.link.stop()
    assert sorted(r.source for r in sub.results.values()) == sorted([*truth, *truth])
    assert again.counters.rejected == 1 and (folder / "rejected" / "0002a-bomb.png").exists()


class MetricsWatcher:
    """Every metrics message of one device, as the hub receives them."""

    def __init__(self, broker: tuple[str, int], site: str, device: str, client_id: str) -> None:
        self.seen: list[messages.Metrics] = []
        self.lock = threading.Lock()
        self.link = MqttLink(BrokerConfig(*broker), client_id,
                             subscriptions=[(topics.topic(site, device, topics.METRICS), 1)],
                             on_message=self._on_message).start()
        assert self.link.wait_connected(10) and self.link.subscribed.wait(10)

    def _on_message(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.seen.append(messages.decode(payload, expect=messages.Metrics))

    def errors(self) -> list[str]:
        with self.lock:
            return [m.source_error for m in self.seen]


def test_a_failing_source_is_reported_at_once_and_opened_again_until_it_works(
        tmp_path, tiny_package, plates, broker, unique, monkeypatch, caplog):
    monkeypatch.setattr(pipeline, "RESTART_FIRST_S", 0.1)
    site = f"agent-{unique}"
    folder = tmp_path / "frames"   # not there yet: an unmounted share, a camera folder not made
    cfg = load(None, {"device": "cam-1", "site": site, "station": "line-a", "package": str(tiny_package),
                      "broker": f"mqtt://{broker[0]}:{broker[1]}", "runtime": "onnxruntime", "threads": 1,
                      "allow_unsigned": True,
                      "sources": [{"uri": str(folder), "cls": "plate", "loop": True}],
                      "spool": {"path": str(tmp_path / "spool.db")},
                      "metrics_interval_s": 600},   # so every metrics message seen here was sent on a change
               environ={})
    watcher = MetricsWatcher(broker, site, "cam-1", f"watch-{unique}")
    agent = Agent(cfg)
    with caplog.at_level(logging.ERROR, logger="agent.pipeline"):
        agent.start()
        try:
            wait_for(lambda: agent.link.connected.is_set(), what="the agent's connection")
            wait_for(lambda: any(f"{folder}: no such file or folder" in e for e in watcher.errors()),
                     what="a metrics message carrying the source's error")
            assert agent.counters.captured == 0 and not agent.sources_done()   # retried, not given up
            plates(3)   # the folder appears
            wait_for(lambda: agent.counters.spooled >= 3, timeout=20, what="results once the folder is there")
            wait_for(lambda: watcher.errors()[-1:] == [""], what="a metrics message saying it works again")
            assert agent.source_error() == ""
        finally:
            agent.shutdown(drain_s=0)
            watcher.link.stop()
    retries = [r.getMessage() for r in caplog.records if "opening it again in" in r.getMessage()]
    assert retries and all(str(folder) in r for r in retries)
