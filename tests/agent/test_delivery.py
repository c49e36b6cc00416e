"""End-to-end delivery on the agent's side, against a real broker: a result leaves the spool only on
the hub's receipt, what stays unconfirmed goes out again, and nothing goes out twice without a fault."""
from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from agent.pipeline import Agent
from agent.spool import Spool
from shared import messages, topics
from shared.config import BrokerConfig
from shared.mqtt import MqttLink
from tests.agent.test_pipeline import Collector, agent_config
from tests.waiting import wait_for


class Silent:
    """A subscriber that takes the results and confirms only what the test tells it to."""

    def __init__(self, broker: tuple[str, int], site: str, client_id: str) -> None:
        self.site = site
        self.got: list[messages.Result] = []
        self.link = MqttLink(BrokerConfig(*broker), client_id,
                             subscriptions=[(topics.topic(site, "cam-1", topics.RESULT), 1)],
                             on_message=lambda t, p: self.got.append(messages.decode(p))).start()
        assert self.link.wait_connected(10) and self.link.subscribed.wait(10)

    def confirm(self, ids: list[str], refused: list[str] = (), reason: str = "") -> None:
        receipt = messages.Receipt(device="cam-1", ts=time.time(), ids=tuple(ids), refused=tuple(refused),
                                   reason=reason)
        self.link.publish(topics.topic(self.site, "cam-1", topics.RECEIPT), messages.encode(receipt))


@contextmanager
def running(agent: Agent, *others: MqttLink) -> Iterator[threading.Thread]:
    """The agent running until drained in a thread; stopped afterwards, with `others`."""
    runner = threading.Thread(target=agent.run, kwargs={"until_drained": True})
    runner.start()
    try:
        yield runner
    finally:
        agent.stop.set()
        runner.join(20)
        for link in others:
            link.stop()


def unconfirmed_site(tmp_path, package, plates, broker, site: str, n: int) -> tuple[Agent, Silent, dict]:
    """An agent on `n` plates and a subscriber that confirms only when told."""
    folder, truth = plates(n)
    hub = Silent(broker, site, f"silent-{site}")
    return Agent(agent_config(tmp_path, package, broker, site, folder)), hub, truth


def counting_publishes(agent: Agent) -> Counter:
    """How often each result payload is handed to the broker."""
    sent: Counter = Counter()
    publish = agent.link.publish

    def counting(topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        mid = publish(topic, payload, qos, retain)
        if topics.parse(topic).kind == topics.RESULT:
            sent[payload] += 1
        return mid

    agent.link.publish = counting
    return sent


def test_a_puback_alone_keeps_the_result_until_its_receipt(tmp_path, tiny_package, plates, broker, unique):
    agent, hub, truth = unconfirmed_site(tmp_path, tiny_package, plates, broker, f"receipt-{unique}", 6)
    agent.publisher.receipt_timeout_s = agent.publisher.receipt_timeout_max_s = 60.0
    with running(agent, hub.link) as runner:
        wait_for(lambda: agent.publisher.acked == len(truth), 20, "every PUBACK")
        assert agent.spool.depth() == len(truth), "a PUBACK must not remove a result from the spool"
        assert agent.metrics().pending_receipts == len(truth) == agent.metrics().spool_depth
        # a PUBACK can come back before the broker has delivered the result to its subscribers
        wait_for(lambda: len({r.id for r in hub.got}) == len(truth), 10, "every result at the subscriber")
        ids = sorted(r.id for r in hub.got)
        hub.confirm(ids[:2])
        hub.confirm(ids[:2])   # receipts are idempotent
        wait_for(lambda: agent.spool.depth() == len(truth) - 2, 10, "two results confirmed")
        assert agent.metrics().pending_receipts == len(truth) - 2
        hub.confirm([], refused=ids[2:3], reason="result.heatmap: not a JPEG or PNG image")
        wait_for(lambda: agent.spool.depth() == len(truth) - 3, 10, "the refused result dropped")
        assert agent.spool.dropped() == {"refused": 1}
        hub.confirm(ids[3:])
        runner.join(20)
        assert not runner.is_alive() and agent.publisher.resent == 0


def test_no_result_is_published_twice_without_a_fault(tmp_path, tiny_package, plates, broker, unique,
                                                      monkeypatch):
    folder, truth = plates(20)
    site = f"once-{unique}"
    sub = Collector(broker, site, "cam-1", f"sub-{unique}")
    confirm = Spool.confirm

    def slow_confirm(self, rids):   # the window in which a sender could pick a result up again
        time.sleep(0.3)
        return confirm(self, rids)

    monkeypatch.setattr(Spool, "confirm", slow_confirm)
    agent = Agent(agent_config(tmp_path, tiny_package, broker, site, folder))
    sent = counting_publishes(agent)
    agent.run(until_drained=True)
    sub.link.stop()
    assert len(sent) == len(truth) and set(sent.values()) == {1}, \
        f"{sum(sent.values()) - len(sent)} duplicate publishes of {len(sent)} results"
    assert agent.publisher.resent == 0 and sub.deliveries == len(truth)


def test_an_unconfirmed_result_is_sent_again(tmp_path, tiny_package, plates, broker, unique):
    agent, hub, truth = unconfirmed_site(tmp_path, tiny_package, plates, broker, f"resend-{unique}", 4)
    agent.publisher.receipt_timeout_s, agent.publisher.receipt_timeout_max_s = 0.5, 1.0
    sent = counting_publishes(agent)
    with running(agent, hub.link) as runner:
        # nothing confirmed: each result goes out again, its wait doubling (0.5 s, then 1 s at most)
        wait_for(lambda: len(sent) == len(truth) and min(sent.values()) >= 3, 20, "three sends of each")
        assert agent.spool.depth() == len(truth)
        hub.confirm(sorted({r.id for r in hub.got}))
        runner.join(20)
        assert not runner.is_alive() and agent.spool.depth() == 0


def test_at_most_receipt_window_results_await_their_receipt(tmp_path, tiny_package, plates, broker, unique):
    agent, hub, truth = unconfirmed_site(tmp_path, tiny_package, plates, broker, f"window-{unique}", 12)
    agent.publisher.receipt_window = 5
    with running(agent, hub.link) as runner:
        wait_for(lambda: agent.counters.spooled == len(truth) and len(hub.got) == 5, 20, "the first five")
        time.sleep(0.5)
        assert len(hub.got) == 5 and agent.publisher.unconfirmed() == 5, "the rest waits in the spool"
        while len({r.id for r in hub.got}) < len(truth):   # each receipt lets the next ones go
            hub.confirm(sorted({r.id for r in hub.got}))
            time.sleep(0.2)
        hub.confirm(sorted({r.id for r in hub.got}))
        runner.join(20)
        assert not runner.is_alive() and agent.spool.depth() == 0
        assert sorted(r.source for r in hub.got) == sorted(truth)   # in order, once each
