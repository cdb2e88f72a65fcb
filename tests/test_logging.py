"""The access log's failure lines are limited in rate: a flood of refused
calls cannot flood the log, and what was left out is counted on the next
line written."""

import logging
import time

import grpc
import pytest

from orgbilling.server.errors import ServiceError
from orgbilling.server.interceptors.access_log import AccessLog

ACCESS_LOGGER = "orgbilling.server.access"


# The failure lines' rate limit, alone, with a clock the test moves.

class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class FakeContext:
    def code(self):
        return None


class FakeCall:
    """What AccessLog reads of a server.interceptors.Call."""

    class method:
        path = "/orgbilling.v1.CreditService/DeductCredits"

    def __init__(self, failure: ServiceError | None):
        self.failure = failure
        self.context = FakeContext()
        self.caller = None
        self.request_id = "rid"
        self.started = time.perf_counter()


REFUSAL = ServiceError(grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", "no credentials")


@pytest.mark.parametrize("mode", ["failures", "all"])
def test_failures_past_the_rate_are_counted_not_logged(caplog, mode):
    clock = FakeClock()
    access_log = AccessLog(mode=mode, failure_lines_per_s=3, clock=clock)
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        for _ in range(1000):
            access_log.ended(FakeCall(REFUSAL))
        assert len(caplog.records) == 3
        clock.now += 1.0
        access_log.ended(FakeCall(REFUSAL))
        # Successes neither take from the failures' budget nor (mode failures) appear.
        access_log.ended(FakeCall(None))
    successes = 1 if mode == "all" else 0
    assert len(caplog.records) == 4 + successes
    assert "997 more failed calls not logged" in caplog.records[3].getMessage()
    assert caplog.records[3].failures_not_logged == 997
    assert "DeductCredits failed: UNAUTHENTICATED UNAUTHENTICATED" in caplog.records[0].getMessage()


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="access_log must be one of failures, all, off"):
        AccessLog(mode="some", failure_lines_per_s=10)
