"""Streams of the open services (reflection, health Watch) are limited in
number (streams_max at once, across them) and in lifetime (lifetime_ms,
after which the stream ends normally at its next message; a silent one is
cut when its connection reaches its age, setting connection_age_max_ms).
Anyone may open them, so without a limit a few callers could hold every
call the server admits (and memory for each)."""

import time

from orgbilling.server.interceptors import Call, Interceptor, Method
from orgbilling.server.interceptors.admission import Slots


class OpenStreamsInterceptor(Interceptor):
    def __init__(self, *, open_services: frozenset[str], streams_max: int, lifetime_ms: int,
                 retry_after_ms: int):
        self._open_services = open_services
        self._lifetime_s = lifetime_ms / 1000
        self._slots = Slots(
            limit=streams_max, setting="open_service_streams_max", retry_after_ms=retry_after_ms,
            busy_message=f"{streams_max} streams of the open services are open already")

    def applies_to(self, method: Method) -> bool:
        return method.service in self._open_services and (
            method.request_streaming or method.response_streaming)

    def intercept(self, call: Call):
        give_back = self._slots.take()
        call.ends_by = time.monotonic() + self._lifetime_s
        return give_back
