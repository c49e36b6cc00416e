"""Nothing is lost: a broker outage mid-stream, and a kill -9 of the agent."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

from agent.pipeline import Agent
from agent.spool import Spool
from shared import messages
from tests.agent.test_pipeline import Collector, agent_config


def test_broker_outage_mid_stream_loses_nothing(tmp_path, tiny_package, plates, private_broker, unique):
    folder, truth = plates(60)
    store = tmp_path / "broker"
    store.mkdir()
    # the broker keeps the subscriber's session across its restart, as a production broker does
    # (`user root`: a broker started as root would drop to the mosquitto user, who may not write here)
    broker = private_broker(extra_conf=f"persistence true\npersistence_location {store}/\n"
                            + ("user root\n" if os.geteuid() == 0 else ""))
    addr = (broker.host, broker.port)
    site = f"outage-{unique}"
    sub = Collector(addr, site, "cam-1", f"sub-{unique}", persistent=True)
    agent = Agent(agent_config(tmp_path, tiny_package, addr, site, folder, fps=30.0))
    runner = threading.Thread(target=agent.run, kwargs={"until_drained": True})
    runner.start()
    time.sleep(0.7)
    broker.stop()
    time.sleep(1.5)
    assert agent.spool.depth() > 0, "the outage should have left results in the spool"
    broker.start()
    runner.join(60)
    assert not runner.is_alive()
    # the subscriber comes back on its own reconnect schedule (backoff up to 30 s), its session kept
    assert sub.link.wait_connected(60)
    # a paced source drops frames at capture under overload (counted); every result made must arrive
    c = agent.counters
    assert c.captured == len(truth) and c.spooled == c.captured - c.dropped - c.skipped
    arrived = sub.wait(c.spooled, 30)
    assert arrived, f"{len(sub.results)} of {c.spooled} results arrived ({c.dropped} frames dropped at capture)"
    sub.link.stop()
    sources = [r.source for r in sub.results.values()]
    assert len(sources) == len(set(sources)) == c.spooled   # each result once, by id


AGENT = """
import sys
from agent.config import load
from agent.pipeline import Agent
from agent.spool import Spool
from shared import messages
cfg = load(None, {{"device": "cam-1", "site": "{site}", "package": "{package}", "broker": "mqtt://{host}:{port}",
                  "runtime": "onnxruntime", "threads": 1, "spool": {{"path": "{spool}"}},
                  "sources": [{{"uri": "{folder}", "cls": "plate", "fps": 25.0}}], "allow_unsigned": True}})
Agent(cfg).run(until_drained=True)
"""


def test_kill_9_mid_stream_then_restart_loses_nothing(tmp_path, tiny_package, plates, private_broker, unique):
    folder, _ = plates(50)
    broker = private_broker()
    site = f"kill-{unique}"
    sub = Collector((broker.host, broker.port), site, "cam-1", f"sub-{unique}")
    code = AGENT.format(site=site, package=tiny_package, host=broker.host, port=broker.port,
                        spool=tmp_path / "spool.db", folder=folder)
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert sub.wait(10, 30), "the agent did not start publishing"
    broker.stop()            # results pile up in the spool, unacknowledged
    time.sleep(0.8)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    spool = Spool(tmp_path / "spool.db")
    stranded = {messages.decode(e.payload).id for e in spool.pending(limit=10_000)}
    spool.close()
    assert stranded, "the kill should have left unacknowledged results in the spool"
    broker.start()
    assert sub.link.wait_connected(60)
    sub.link.subscribed.wait(10)
    # the restarted agent replays the folder: the spool's backlog goes first, then new results
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert proc.wait(90) == 0
    finally:
        proc.kill()
    # every result stranded in the spool by the kill arrived after the restart
    assert sub.wait_until(lambda ids: stranded <= ids, 30), f"{len(stranded - set(sub.results))} stranded never arrived"
    sub.link.stop()


def test_results_nobody_subscribes_to_are_kept_until_someone_does(tmp_path, tiny_package, plates, private_broker,
                                                                   unique):
    folder, truth = plates(5)
    broker = private_broker()   # a new site's broker: the hub has never subscribed
    site = f"unrouted-{unique}"
    agent = Agent(agent_config(tmp_path, tiny_package, (broker.host, broker.port), site, folder))
    agent.publisher.resend_after_s = 1.0
    runner = threading.Thread(target=agent.run, kwargs={"until_drained": True})
    runner.start()
    deadline = time.monotonic() + 20
    while agent.publisher.published < 2 * len(truth) and time.monotonic() < deadline:
        time.sleep(0.05)   # sent, acknowledged as "no matching subscribers", sent again
    assert agent.publisher.published >= 2 * len(truth) and agent.spool.depth() == len(truth)
    sub = Collector((broker.host, broker.port), site, "cam-1", f"sub-{unique}")
    runner.join(30)
    assert not runner.is_alive()
    assert sub.wait(len(truth), 10), f"{len(sub.results)} of {len(truth)} arrived"
    sub.link.stop()


def test_sigterm_delivers_what_was_made_before_going_offline(tmp_path, tiny_package, plates, broker, unique):
    folder, _ = plates(20)
    site = f"term-{unique}"
    sub = Collector(broker, site, "cam-1", f"sub-{unique}")
    spool_path = tmp_path / "spool.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--folder", str(folder), "--loop", "--fps", "50",
         "--package", str(tiny_package), "--broker", f"mqtt://{broker[0]}:{broker[1]}", "--site", site,
         "--device", "cam-1", "--cls", "plate", "--spool", str(spool_path), "--runtime", "onnxruntime",
         "--allow-unsigned"],
        env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert sub.wait(30, 30), "the agent did not start publishing"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    with sqlite3.connect(spool_path) as db:
        made = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'spool'").fetchone()[0]
        left = db.execute("SELECT count(*) FROM spool").fetchone()[0]
    assert left == 0, f"{left} results left undelivered in the spool"
    assert sub.wait(made, 10), f"{len(sub.results)} of {made} results arrived"
    sub.link.stop()
