"""A reload asked for on the request path: throttled, and shared by every
call that asks for it meanwhile.

A credential naming a key the server has not loaded (an API key made since
the last reload, a JWT signed with a key the provider has just rotated in)
asks for a reload at once, so that it works on its first call. Callers
guessing ids must not turn that into a database query or a fetch per call:
so at most one reload starts per interval for the whole server, and calls
that ask while it runs wait for that one (a bounded time) instead of
starting their own.
"""

import threading
import time
from collections.abc import Callable


class SharedReload:
    def __init__(self, reload: Callable[[], None], *, interval_s: float, wait_s: float,
                 on_failure: Callable[[Exception], None]):
        self._reload = reload
        self._interval_s = interval_s
        self._wait_s = wait_s
        self._on_failure = on_failure
        self._lock = threading.Lock()  # guards the two fields below; never held across I/O
        self._in_flight: threading.Event | None = None
        self._last_started = float("-inf")

    def run(self) -> None:
        """Reloads, or waits for the reload in flight; returns when it is
        done or wait_s has passed, or at once when the interval since the
        last one has not. A failed reload goes to on_failure, not the caller."""
        with self._lock:
            in_flight = self._in_flight
            if in_flight is None:
                now = time.monotonic()
                if now - self._last_started < self._interval_s:
                    return
                self._last_started = now
                self._in_flight = threading.Event()
        if in_flight is not None:
            in_flight.wait(self._wait_s)
            return
        try:
            self._reload()
        except Exception as error:  # noqa: BLE001: the key is then refused as unknown
            self._on_failure(error)
        finally:
            with self._lock:
                done, self._in_flight = self._in_flight, None
            done.set()
