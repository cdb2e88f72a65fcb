"""Refused calls are logged a line each, at most lines_per_s a second: a
flood of refusals cannot flood the log, and what was left out is counted on
the next line written."""

import logging

import grpc

from orgbilling.server.errors import ServiceError
from orgbilling.server.interceptors.refusal_log import RefusalLog

REFUSAL = ServiceError(grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", "no credentials")


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_refusals_past_the_rate_are_counted_not_logged(caplog):
    clock = FakeClock()
    refusals = RefusalLog(lines_per_s=3, clock=clock)
    with caplog.at_level(logging.INFO, logger="orgbilling.server.refusals"):
        for _ in range(1000):
            refusals.refused("/orgbilling.v1.CreditService/DeductCredits", REFUSAL)
        assert len(caplog.records) == 3
        clock.now += 1.0
        refusals.refused("/orgbilling.v1.CreditService/DeductCredits", REFUSAL)
    assert len(caplog.records) == 4
    assert "(997 more refusals not logged)" in caplog.records[-1].getMessage()
    assert "DeductCredits failed: UNAUTHENTICATED UNAUTHENTICATED" in caplog.records[0].getMessage()
