"""One MQTT connection with the habits a long-running device needs.

Speaks MQTT 5 when the broker does and falls back to 3.1.1 when it refuses;
reconnects with backoff and jitter; resubscribes and calls `on_connect` (the
place to publish a retained birth message) on every connect; reports broker
acknowledgements of QoS 1 publishes (an MQTT 5 "no matching subscribers"
acknowledgement is not reported: nobody would ever read that message, so the
sender keeps it and sends it again); one failing message handler never stops
the loop. Bad credentials stop the retries: they will not heal by waiting.

TLS (``mqtts://``): the broker's certificate is checked against the
configured CA (the system store without one) and its host name; a client
certificate and key are shown when configured. What waiting cannot heal stops
the retries with an error in `fatal` that says what to change: an untrusted
certificate, a TLS client at a plain listener, a plain client at a TLS one.

With ``manual_ack=True`` a QoS 1 message is acknowledged only when the
receiver says so (after its database commit, say): `on_message` then gets a
third argument, an `Ack` to call once the message is safe. Until then the
broker keeps the message in the session and sends it again after a
reconnect, so a receiver that crashes loses nothing. An `Ack` from an earlier
connection does nothing (packet ids are reused per connection); the broker
redelivers those messages instead.
"""
from __future__ import annotations

import logging
import random
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shared.config import BrokerConfig

log = logging.getLogger(__name__)

PROTOCOL_5 = "5"
PROTOCOL_311 = "3.1.1"
_REFUSED_PROTOCOL = {1, 132}          # 3.1.1 "unacceptable protocol version", MQTT 5 0x84
_REFUSED_AUTH = {4, 5, 134, 135}      # bad user/password, not authorised
_LOG_PAYLOAD = 64
TLS_PROBE_S = 3.0  # how long a plain client waits to learn whether the port speaks TLS
SESSION_EXPIRY_S = 24 * 3600  # how long the broker keeps a persistent session's queued messages
NO_MATCHING_SUBSCRIBERS = 0x10  # MQTT 5 PUBACK reason: accepted, but no subscription matched
UNROUTED_WARN_EVERY_S = 60.0

Subscriptions = Sequence[tuple[str, int]] | Callable[[str], Sequence[tuple[str, int]]]
# manual acknowledgement: call once the message is safe; False when the connection it came on is gone
Ack = Callable[[], bool]


class NotConnected(RuntimeError):
    """Publishing while the broker is unreachable; the caller keeps the message."""


def tls_context(broker: BrokerConfig) -> ssl.SSLContext:
    """The TLS settings of an ``mqtts://`` broker; ValueError naming the file that will not load."""
    try:
        context = ssl.create_default_context(cafile=broker.ca_file)
    except FileNotFoundError:
        raise ValueError(f"broker {broker.url}: ca_file {broker.ca_file} does not exist") from None
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"broker {broker.url}: ca_file {broker.ca_file} is not a PEM CA certificate ({exc})") from None
    if broker.cert_file:
        try:
            context.load_cert_chain(broker.cert_file, broker.key_file)
        except FileNotFoundError as exc:
            raise ValueError(f"broker {broker.url}: {exc.filename or broker.cert_file} does not exist") from None
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"broker {broker.url}: cert_file {broker.cert_file} and key_file {broker.key_file} "
                             f"are not a PEM certificate and its key ({exc})") from None
    return context


def speaks_plain_mqtt(host: str, port: int, timeout: float = TLS_PROBE_S) -> bool:
    """True when host:port answers a plain MQTT 3.1.1 CONNECT with a CONNACK (whatever its verdict)."""
    client_id = b"kdfleet-probe"
    body = b"\x00\x04MQTT\x04\x02\x00\x05" + len(client_id).to_bytes(2, "big") + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(bytes([0x10, len(body)]) + body)
            return s.recv(1)[:1] == b"\x20"
    except OSError:
        return False


def speaks_tls(host: str, port: int, timeout: float = TLS_PROBE_S) -> bool:
    """True when a TLS handshake (certificate unchecked) succeeds at host:port."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host):
            return True
    except (OSError, ValueError):
        return False


class MqttLink:
    """A supervised paho-mqtt client."""

    def __init__(
        self,
        broker: BrokerConfig,
        client_id: str,
        *,
        subscriptions: Subscriptions = (),
        on_message: Callable[..., None] | None = None,
        will: tuple[str, bytes] | None = None,
        on_connect: Callable[[], None] | None = None,
        on_published: Callable[[int], None] | None = None,
        clean_start: bool = True,
        protocol: str | None = None,
        manual_ack: bool = False,
        receive_maximum: int | None = None,
        unrouted: str = "(is the hub running?); results are kept and sent again",
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        # a callable gets the protocol ("5" or "3.1.1"): shared subscriptions need MQTT 5
        self.subscriptions = subscriptions if callable(subscriptions) else list(subscriptions)
        self.on_message = on_message
        self.will = will
        self.on_connect_cb = on_connect
        self.on_published = on_published
        self.clean_start = clean_start
        self.protocol = protocol or PROTOCOL_5
        self._auto_protocol = protocol is None
        # on_message(topic, payload, ack) and PUBACK only when ack() is called
        self.manual_ack = manual_ack
        # MQTT 5: most unacknowledged QoS 1 messages the broker may send us (brokers default to ~20)
        if receive_maximum is not None and not 1 <= receive_maximum <= 65535:
            raise ValueError(f"receive_maximum {receive_maximum} is not within 1..65535")
        self.receive_maximum = receive_maximum
        self.unrouted = unrouted  # what a publish no subscriber takes means for this client; "": not logged
        self._generation = 0  # bumped on every connect and disconnect: acks of older ones are void
        self._ack_lock = threading.Lock()
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # every subscription of this connection confirmed
        self._pending_subs: set[int] = set()
        self.fatal: str | None = None  # set when retrying cannot help (bad credentials)
        self._unrouted_warned = -UNROUTED_WARN_EVERY_S
        self._client: paho.Client | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self._failures_before_connack = 0
        self._tls = tls_context(broker) if broker.tls else None
        self._probed_tls = False

    # -- life cycle -------------------------------------------------------------

    def start(self) -> MqttLink:
        """Connect in the background; returns at once (see `wait_connected`)."""
        self._stopping = False
        self._client = self._make_client()
        if self.protocol == PROTOCOL_5:
            props = None
            if not self.clean_start or self.receive_maximum:
                props = Properties(PacketTypes.CONNECT)
                if not self.clean_start:
                    props.SessionExpiryInterval = SESSION_EXPIRY_S
                if self.receive_maximum:
                    props.ReceiveMaximum = self.receive_maximum
            self._client.connect_async(self.broker.host, self.broker.port, keepalive=self.broker.keepalive,
                                       clean_start=self.clean_start, properties=props)
        else:
            self._client.connect_async(self.broker.host, self.broker.port, keepalive=self.broker.keepalive)
        self._client.loop_start()
        return self

    def stop(self, final: tuple[str, bytes, bool] | None = None) -> None:
        """Disconnect cleanly; `final` = (topic, payload, retain) is published first (an offline status)."""
        self._stopping = True
        client = self._client
        if client is None:
            return
        if final is not None and self.connected.is_set():
            try:
                client.publish(final[0], final[1], qos=1, retain=final[2]).wait_for_publish(2.0)
            except (RuntimeError, ValueError):
                log.warning("could not publish the final message to %s", final[0])
        client.disconnect()
        client.loop_stop()
        self.connected.clear()
        self._client = None

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    # -- publishing -------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Hand a message to the broker connection; returns its message id.

        Raises NotConnected while the broker is away, so the caller keeps the
        message rather than trusting an in-memory queue.
        """
        client = self._client
        if client is None or not self.connected.is_set():
            raise NotConnected(f"not connected to {self.broker.url}")
        info = client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise NotConnected(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        return info.mid

    # -- paho plumbing ------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        proto = paho.MQTTv5 if self.protocol == PROTOCOL_5 else paho.MQTTv311
        kwargs = {} if proto == paho.MQTTv5 else {"clean_session": self.clean_start}
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=proto,
                             manual_ack=self.manual_ack, **kwargs)
        if self.broker.username:
            client.username_pw_set(self.broker.username, self.broker.password)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        if self.will:
            client.will_set(self.will[0], self.will[1], qos=1, retain=True)
        # jitter spreads a fleet's reconnects after a broker restart
        client.reconnect_delay_set(min_delay=1, max_delay=int(20 + random.random() * 10))
        client.max_inflight_messages_set(100)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        code = reason_code.value if hasattr(reason_code, "value") else int(reason_code)
        if code != 0:
            log.warning("broker %s refused the connection: %s", self.broker.url, reason_code)
            if code in _REFUSED_AUTH:
                self._give_up(f"broker {self.broker.url} refused the credentials ({reason_code}); "
                              "fix username/password")
            elif code in _REFUSED_PROTOCOL and self._auto_protocol and self.protocol == PROTOCOL_5:
                self._fall_back()
            return
        self._failures_before_connack = 0
        with self._ack_lock:
            self._generation += 1
        subs = self.subscriptions(self.protocol) if callable(self.subscriptions) else self.subscriptions
        self.subscribed.clear()
        self._pending_subs = set()
        for topic, qos in subs:
            rc, mid = client.subscribe(topic, qos)
            if rc == paho.MQTT_ERR_SUCCESS:
                self._pending_subs.add(mid)
        if not self._pending_subs:
            self.subscribed.set()
        self.connected.set()
        log.info("connected to %s (MQTT %s)", self.broker.url, self.protocol)
        if self.on_connect_cb:
            try:
                self.on_connect_cb()
            except Exception:
                log.exception("on_connect handler failed")

    def _give_up(self, reason: str) -> None:
        """Stop retrying: `reason` says what to change."""
        if self.fatal is None:
            self.fatal = reason
            log.error("%s", reason)
            threading.Thread(target=self.stop, daemon=True).start()

    def _on_connect_fail(self, client, userdata) -> None:
        # paho calls this inside its `except OSError`: the error is the one being handled
        exc = sys.exc_info()[1]
        if isinstance(exc, ssl.SSLCertVerificationError):
            self._give_up(f"broker {self.broker.url}: its TLS certificate is not trusted "
                          f"({exc.verify_message}); ca_file ({self.broker.ca_file or 'the system store'}) "
                          "must hold the CA that signed it, for the host name in the URL")
        elif isinstance(exc, ssl.SSLError) and not isinstance(exc, (ssl.SSLZeroReturnError, ssl.SSLEOFError)):
            self._give_up(f"broker {self.broker.url}: no TLS at port {self.broker.port} ({exc.reason or exc}); "
                          "is it a plain MQTT listener? Then use mqtt://, or the broker's TLS port")
        elif isinstance(exc, (ConnectionResetError, ssl.SSLEOFError)) and not self._probed_tls:
            # a plain listener drops a TLS handshake; so does a broker going down: ask it plainly
            self._probed_tls = True
            if speaks_plain_mqtt(self.broker.host, self.broker.port):
                self._give_up(f"broker {self.broker.url}: no TLS at port {self.broker.port}, it speaks plain "
                              "MQTT: use mqtt://, or the broker's TLS port")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self.connected.is_set()
        with self._ack_lock:  # an ack racing this disconnect either went out on the old socket or is void
            self._generation += 1
        self.connected.clear()
        self.subscribed.clear()
        if self._stopping:
            return
        if was_connected:
            log.warning("lost connection to %s (%s); reconnecting", self.broker.url, reason_code)
            return
        if self._tls is None and not self._probed_tls:
            self._probed_tls = True   # a TLS listener drops a plain CONNECT without a word
            if speaks_tls(self.broker.host, self.broker.port):
                self._give_up(f"broker {self.broker.host}:{self.broker.port} speaks TLS: use "
                              f"mqtts://{self.broker.host}:{self.broker.port} (with the CA that signed "
                              "its certificate as ca_file)")
                return
        # a broker that speaks only 3.1.1 may simply drop an MQTT 5 CONNECT
        self._failures_before_connack += 1
        if self._auto_protocol and self.protocol == PROTOCOL_5 and self._failures_before_connack >= 2:
            self._fall_back()

    def _fall_back(self) -> None:
        log.info("broker %s does not speak MQTT 5; using 3.1.1", self.broker.url)
        self.protocol = PROTOCOL_311
        threading.Thread(target=self._restart, daemon=True).start()

    def _restart(self) -> None:
        with self._lock:
            old = self._client
            if old is not None:
                old.disconnect()
                old.loop_stop()
            if self._stopping:
                return
            self._failures_before_connack = 0
            self.start()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        for rc in reason_codes:
            if getattr(rc, "is_failure", False) or getattr(rc, "value", 0) == 0x80:
                log.error("broker %s refused a subscription (%s): check the ACL", self.broker.url, rc)
        self._pending_subs.discard(mid)
        if not self._pending_subs:
            self.subscribed.set()

    def _on_message(self, client, userdata, message) -> None:
        if self.manual_ack:
            ack = self._acker(client, message.mid, message.qos)
            if self.on_message is None:
                ack()
                return
            try:
                self.on_message(message.topic, message.payload, ack)
            except Exception:
                # acknowledged anyway: a message that crashes its handler would stall the session
                log.exception("handler failed for %s payload %r; acknowledged", message.topic,
                              message.payload[:_LOG_PAYLOAD])
                ack()
            return
        if self.on_message is None:
            return
        try:
            self.on_message(message.topic, message.payload)
        except Exception:
            log.exception("handler failed for %s payload %r", message.topic, message.payload[:_LOG_PAYLOAD])

    def _acker(self, client: paho.Client, mid: int, qos: int) -> Ack:
        """The acknowledgement of one received message, valid only on the connection it came on."""
        generation = self._generation

        def ack() -> bool:
            if qos == 0:
                return True
            with self._ack_lock:
                if generation != self._generation or self._client is not client:
                    return False  # the broker redelivers it on the new connection
                return client.ack(mid, qos) == paho.MQTT_ERR_SUCCESS

        return ack

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if getattr(reason_code, "is_failure", False):
            log.error("broker rejected message %s: %s", mid, reason_code)
            return
        if getattr(reason_code, "value", 0) == NO_MATCHING_SUBSCRIBERS:
            # accepted, but nobody (not even an offline persistent session) will ever read it:
            # not delivered, so the sender keeps it and tries again later
            now = time.monotonic()
            if self.unrouted and now - self._unrouted_warned > UNROUTED_WARN_EVERY_S:
                self._unrouted_warned = now
                log.warning("broker %s has no subscriber for what we publish %s", self.broker.url, self.unrouted)
            return
        if self.on_published:
            try:
                self.on_published(mid)
            except Exception:
                log.exception("on_published handler failed")
