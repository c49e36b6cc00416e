"""Following the hub's desired model: one update at a time, on its own thread.

The hub keeps a retained `model/desired` message per device. Each one that
arrives replaces any not yet started (only the latest desire matters); the
worker then installs it with the Updater (download, verify, build, golden
self-test, atomic install) and hands the built runtime to the pipeline's
swap. A desire for the model already running is answered "active" at once;
one for the model that ran before (a roll back) is installed from disk
without a download and reported as "rolled_back". States go to the hub on `model/state`; the last one is
sent again after a reconnect, so a report made while the broker was away is
not lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from agent.runtimes import Runtime
from agent.updater import BuildRuntime, Updater, UpdateError
from shared import messages
from shared.mqtt import NotConnected
from shared.package import Package
from shared.vocabulary import MODEL_ACTIVE, MODEL_FAILED, MODEL_ROLLED_BACK

log = logging.getLogger(__name__)

Swap = Callable[[Package, Runtime], None]
PublishState = Callable[[messages.ModelState], None]


class UpdateWorker:
    def __init__(self, updater: Updater, build: BuildRuntime, swap: Swap, publish: PublishState,
                 stop: threading.Event, current: Callable[[], Package]) -> None:
        self.updater, self.build, self.swap, self.publish = updater, build, swap, publish
        self.stop, self.current = stop, current
        self._lock = threading.Lock()
        self._next: messages.ModelDesired | None = None
        self._last_state: messages.ModelState | None = None
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="updates", daemon=True)
        self.applied = 0   # updates installed and swapped in
        self.swapped_at: float | None = None   # monotonic time of the last swap

    def start(self) -> None:
        self._thread.start()

    def desired(self, want: messages.ModelDesired) -> None:
        """A desired-model message (MQTT network thread): queued, replacing one not yet started."""
        with self._lock:
            self._next = want
        self._wake.set()

    def connected(self) -> None:
        """A new broker connection: send the last state again (it may have been lost)."""
        with self._lock:
            state = self._last_state
        if state is not None:
            self._send(state)

    def _run(self) -> None:
        while not self.stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            with self._lock:
                want, self._next = self._next, None
            if want is not None:
                self._follow(want)

    def _follow(self, want: messages.ModelDesired) -> None:
        running = self.current()
        if (running.manifest.model_id, running.version) == (want.model_id, want.version):
            self._report(messages.ModelState(self.updater.device, time.time(), MODEL_ACTIVE, want.model_id,
                                             want.version, want.rollout_id))
            return
        back = self.updater.last_good()
        try:
            if back is not None and (back.version, back.sha256) == (want.version, want.sha256.lower()):
                # going back to the model that ran before: it is on disk, built before the pointer moves
                package = self.updater.read(back.path)
                runtime = self.build(package.model, package.manifest)
                self.updater.rollback(rollout_id=want.rollout_id)
                self.swap(package, runtime)
                self._report(messages.ModelState(
                    self.updater.device, time.time(), MODEL_ROLLED_BACK, want.model_id, want.version, want.rollout_id,
                    reason=f"back on {want.model_id} {want.version}, the model it ran before "
                           f"{running.manifest.model_id} {running.version}, as the hub asked"))
            else:
                installed = self.updater.apply(want, build_runtime=self.build, on_state=self._report)
                package = installed.package or self.updater.read(installed.path)
                runtime = installed.runtime or self.build(package.model, package.manifest)
                self.swap(package, runtime)
            self.applied += 1
            self.swapped_at = time.monotonic()
        except UpdateError as exc:   # already reported as failed by the updater; the old model runs on
            log.warning("staying on %s %s: %s", running.manifest.model_id, running.version, exc)
        except Exception as exc:
            log.exception("update to %s %s failed", want.model_id, want.version)
            self._report(messages.ModelState(self.updater.device, time.time(), MODEL_FAILED, want.model_id,
                                             want.version, want.rollout_id,
                                             reason=f"{type(exc).__name__}: {exc}"[: messages.MAX_TEXT]))

    def _report(self, state: messages.ModelState) -> None:
        with self._lock:
            self._last_state = state
        self._send(state)

    def _send(self, state: messages.ModelState) -> None:
        try:
            self.publish(state)
        except NotConnected:
            log.info("model state %s kept for the next connection", state.state)
