"""MqttLink against real brokers: Mosquitto (MQTT 5) and amqtt (MQTT 3.1.1 only)."""
import shutil
import socket
import subprocess
import sys
import time

import pytest

from shared.config import BrokerConfig
from shared.mqtt import PROTOCOL_5, PROTOCOL_311, MqttLink, NotConnected
from tests.waiting import wait_for


def exchange(host, port, unique, expect_protocol):
    got, acks = [], []
    sub = MqttLink(BrokerConfig(host, port), f"sub-{unique}", subscriptions=[(f"kdtest/{unique}/#", 1)],
                   on_message=lambda t, p: got.append(p)).start()
    pub = MqttLink(BrokerConfig(host, port), f"pub-{unique}", on_published=acks.append).start()
    try:
        assert sub.wait_connected(15) and pub.wait_connected(15)
        assert pub.protocol == expect_protocol
        time.sleep(0.2)
        mids = [pub.publish(f"kdtest/{unique}/x", b"%d" % i) for i in range(20)]
        wait_for(lambda: len(got) == 20 and len(acks) == 20, what="20 messages and 20 acknowledgements")
        assert got == [b"%d" % i for i in range(20)] and sorted(acks) == sorted(mids)
    finally:
        sub.stop()
        pub.stop()


def test_mqtt5_with_mosquitto(broker, unique):
    exchange(*broker, unique, PROTOCOL_5)


def test_falls_back_to_311_with_a_311_only_broker(tmp_path, unique):
    pytest.importorskip("amqtt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "amqtt.yaml"
    conf.write_text(f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\nplugins:\n"
                    "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n")
    exe = shutil.which("amqtt", path=str(__import__("pathlib").Path(sys.executable).parent))
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _open(port), 20, "amqtt to start")
        exchange("127.0.0.1", port, unique, PROTOCOL_311)
    finally:
        proc.terminate()
        proc.wait(10)


def _open(port):
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


def test_publish_while_broker_down_raises(private_broker, unique):
    b = private_broker()
    link = MqttLink(BrokerConfig(b.host, b.port), f"down-{unique}").start()
    try:
        assert link.wait_connected(10)
        b.stop()
        wait_for(lambda: not link.connected.is_set(), what="the link to notice the broker is gone")
        with pytest.raises(NotConnected):
            link.publish("kdtest/x", b"1")
        b.start()
        assert link.wait_connected(30), "did not reconnect after the broker came back"
    finally:
        link.stop()


def test_last_will_marks_a_vanished_client(broker, unique):
    got = []
    topic = f"kdtest/{unique}/status"
    watcher = MqttLink(BrokerConfig(*broker), f"w-{unique}", subscriptions=[(topic, 1)],
                       on_message=lambda t, p: got.append(p)).start()
    code = ("import time,sys;from shared.config import BrokerConfig;from shared.mqtt import MqttLink;"
            f"l=MqttLink(BrokerConfig('{broker[0]}',{broker[1]},keepalive=2),'dying-{unique}',"
            f"will=('{topic}',b'offline')).start();l.wait_connected(10);print('up',flush=True);time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert watcher.wait_connected(10)
        assert proc.stdout.readline().strip() == b"up"
        proc.kill()  # no clean disconnect: the broker must publish the will
        wait_for(lambda: b"offline" in got, 15, "the will (offline)")
    finally:
        proc.kill()
        watcher.stop()


def test_manual_ack_leaves_unacknowledged_messages_with_the_broker(private_broker, unique):
    """A message is acknowledged only when the receiver says so; what it never acknowledged
    comes again on the next connection of the same persistent session."""
    b = private_broker()
    cfg = BrokerConfig(b.host, b.port)
    got = []
    topic = f"kdtest/{unique}/r"

    def receiver(handler):
        return MqttLink(cfg, f"recv-{unique}", subscriptions=[(topic, 1)], on_message=handler,
                        manual_ack=True, clean_start=False, receive_maximum=50).start()

    first = receiver(lambda t, p, ack: got.append((p, ack)))
    pub = MqttLink(cfg, f"pub-{unique}").start()
    try:
        assert first.subscribed.wait(10) and pub.wait_connected(10)
        for i in range(6):
            pub.publish(topic, b"%d" % i)
        wait_for(lambda: len(got) == 6, what="6 messages")
        assert all(ack() for _, ack in got[:3])  # the first three are safe, the rest not
        time.sleep(0.2)  # the acknowledgements reach the broker
        first.stop()
        assert not got[4][1](), "an ack from a closed connection is void"
        again = []
        second = receiver(lambda t, p, ack: (again.append(p), ack()))
        try:
            wait_for(lambda: len(again) >= 3, what="3 messages after the reconnect")
            time.sleep(0.3)
            assert sorted(again) == [b"3", b"4", b"5"]
        finally:
            second.stop()
    finally:
        pub.stop()
