"""The rollout controller: the hub process that drives rollouts over MQTT.

It listens to every device's `model/state` reports, records them on the
rollout targets, and once a second moves each live rollout a step
(hub/services/rollouts.py decides), publishing each device's desired model
as a retained QoS 1 message. A step's database changes are committed only
after its messages went out, so a crash between the two resends the same
retained messages on the next step: devices see the same desire twice, never
a desire the database does not know.
"""

from __future__ import annotations

import logging
import threading

from hub.db.session import Database
from hub.services import rollouts
from shared import messages, topics
from shared.config import BrokerConfig
from shared.mqtt import MqttLink, NotConnected

log = logging.getLogger(__name__)


class RolloutController:
    def __init__(self, db: Database, broker: BrokerConfig, *, interval_s: float = 1.0,
                 client_id: str = "kdfleet-hub-rollouts") -> None:
        self.db, self.broker, self.interval_s, self.client_id = db, broker, interval_s, client_id
        self.reports = 0  # model/state messages applied to a rollout
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._link: MqttLink | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> RolloutController:
        self._stop.clear()
        self._link = MqttLink(self.broker, self.client_id, clean_start=False, on_message=self.handle,
                              subscriptions=[(topics.subscription(topics.MODEL_STATE), 1)]).start()
        self._thread = threading.Thread(target=self._loop, name="hub-rollouts", daemon=True)
        self._thread.start()
        log.info("rollout controller connecting to %s", self.broker.url)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._link is not None:
            self._link.stop()

    def wait_ready(self, timeout: float) -> bool:
        """True once connected with the state subscription confirmed."""
        link = self._link
        return link is not None and link.wait_connected(timeout) and link.subscribed.wait(timeout)

    def handle(self, topic: str, payload: bytes) -> None:
        """A device's update progress (MQTT network thread)."""
        try:
            address = topics.parse(topic)
            msg = messages.decode(payload, expect=messages.ModelState)
        except (topics.TopicError, messages.MessageError) as exc:
            log.warning("ignored model state on %s: %s", topic, exc)
            return
        with self.db.transaction() as session:
            applied = rollouts.record_state(session, address.site, address.device, msg)
        if applied:
            self.reports += 1
            log.info("%s/%s: %s %s %s", address.site, address.device, msg.state, msg.version, msg.reason)
            self._wake.set()

    def step(self) -> int:
        """Advance every live rollout once; returns the number of desired-model messages sent."""
        link = self._link
        if link is None or not link.connected.is_set():
            return 0
        session = self.db.session()
        try:
            out = rollouts.advance(session)
            for o in out:
                link.publish(topics.topic(o.site, o.device, topics.MODEL_DESIRED),
                             messages.encode(o.desired), qos=1, retain=True)
            session.commit()
        except NotConnected as exc:
            session.rollback()
            log.warning("rollout step put off: %s", exc)
            return 0
        except Exception:
            session.rollback()
            raise
        finally:
            session.close()
        for o in out:
            log.info("%s/%s: desired model %s %s (rollout %s)", o.site, o.device, o.desired.model_id,
                     o.desired.version, o.desired.rollout_id)
        return len(out)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:
                log.exception("rollout step failed; retrying")
            self._wake.wait(self.interval_s)
            self._wake.clear()
