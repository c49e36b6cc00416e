"""The rollout controller: the hub process that drives rollouts over MQTT.

It listens to every device's `model/state` reports, records them on the
rollout targets, and once a second moves each live rollout a step
(hub/services/rollouts.py decides), publishing each device's desired model
as a retained QoS 1 message. A step's database changes are committed only
after its messages went out, so a crash between the two resends the same
retained messages on the next step: devices see the same desire twice, never
a desire the database does not know.

It also listens to every device's birth (`status`, online): a device that
(re)connects not running what the hub last told it is told again, because a
broker restarted without persistence has forgotten the retained message.

With several hub processes on one database each runs a controller, but only
the one that leads (hub.leader) steps rollouts; the others record the devices'
reports as well (the same update twice changes nothing) and take over the
stepping when the leader is gone.
"""

from __future__ import annotations

import logging
import threading
import time

from hub.db.session import Database
from hub.leader import Leadership
from hub.services import rollouts
from shared import messages, topics
from shared.config import BrokerConfig
from shared.mqtt import MqttLink, NotConnected

log = logging.getLogger(__name__)


class RolloutController:
    def __init__(self, db: Database, broker: BrokerConfig, *, interval_s: float = 1.0,
                 client_id: str = "kdfleet-hub-rollouts", leadership: Leadership | None = None) -> None:
        self.db, self.broker, self.interval_s, self.client_id = db, broker, interval_s, client_id
        self.leadership = leadership  # None: this process alone drives rollouts
        self.reports = 0  # model/state messages applied to a rollout
        self.resent = 0  # desired models sent again to devices that reconnected
        # (site, device) -> the version it runs and when its birth arrived (monotonic), since the last step
        self._births: dict[tuple[str, str], tuple[str, float]] = {}
        self._told: dict[tuple[str, str], float] = {}  # (site, device) -> when it was last published a desire
        self._births_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._link: MqttLink | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> RolloutController:
        self._stop.clear()
        # "": a desired model no device subscribes to yet is retained for it; `step` logs which devices are offline
        self._link = MqttLink(self.broker, self.client_id, clean_start=False, on_message=self.handle,
                              subscriptions=[(topics.subscription(topics.MODEL_STATE), 1),
                                             (topics.subscription(topics.STATUS), 1)], unrouted="")
        self._link.start()
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
        """A device's update progress or birth (MQTT network thread)."""
        try:
            address = topics.parse(topic)
            if address.kind == topics.STATUS:
                if payload:   # an empty retained message clears a device's status
                    self._on_status(address, messages.decode(payload, expect=messages.Status))
                return
            msg = messages.decode(payload, expect=messages.ModelState)
        except (topics.TopicError, messages.MessageError) as exc:
            log.warning("ignored message on %s: %s", topic, exc)
            return
        with self.db.transaction() as session:
            applied = rollouts.record_state(session, address.site, address.device, msg)
        if applied:
            self.reports += 1
            log.info("%s/%s: %s, %s %s%s", address.site, address.device, msg.state.replace("_", " "),
                     msg.model_id, msg.version, f": {msg.reason}" if msg.reason else "")
            self._wake.set()

    def _on_status(self, address: topics.Address, status: messages.Status) -> None:
        if status.online:
            with self._births_lock:
                self._births[address.site, address.device] = status.model_version, time.monotonic()
            self._wake.set()

    def step(self) -> int:
        """Advance every live rollout once; returns the number of desired-model messages sent."""
        link = self._link
        if link is None or not link.connected.is_set():
            return 0
        with self._births_lock:
            births, self._births = self._births, {}
        if self.leadership is not None and not self.leadership.leads():
            return 0  # the leader answers the births too: it hears them as well
        session = self.db.session()
        try:
            out = rollouts.advance(session)
            told = {(o.site, o.device) for o in out}
            # a birth that arrived before this process last published to the device came from a connection
            # that received that message: it is not a reconnect that missed it
            again = [o for (site, device), (running, arrived) in births.items() if (site, device) not in told
                     and arrived > self._told.get((site, device), float("-inf"))
                     and (o := rollouts.resend(session, site, device, running)) is not None]
            out += again
            for o in out:
                link.publish(topics.topic(o.site, o.device, topics.MODEL_DESIRED),
                             messages.encode(o.desired), qos=1, retain=True)
                self._told[o.site, o.device] = time.monotonic()
            session.commit()
        except NotConnected as exc:
            session.rollback()
            self._keep(births)
            log.warning("rollout step put off: %s", exc)
            return 0
        except Exception:
            session.rollback()
            self._keep(births)
            raise
        finally:
            session.close()
        self.resent += len(again)
        for o in out:
            log.info("%s/%s: %s model %s %s (rollout %s)%s", o.site, o.device,
                     "told again, on reconnecting, of its desired" if o in again else "desired",
                     o.desired.model_id, o.desired.version, o.desired.rollout_id,
                     "" if o.online else "; the device is offline: the message is retained for it and sent "
                                         "again when it reconnects")
        return len(out)

    def _keep(self, births: dict[tuple[str, str], tuple[str, float]]) -> None:
        """Births a failed step did not answer: the next step does (newer ones win)."""
        with self._births_lock:
            self._births = births | self._births

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:
                log.exception("rollout step failed; retrying")
            self._wake.wait(self.interval_s)
            self._wake.clear()
