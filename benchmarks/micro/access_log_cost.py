"""CPU per call of the access log, measured alone: AccessLogInterceptor's
intercept and end for one call, by mode and format, with the server's own
logging configuration writing to a file. The end-to-end figure is make
bench's `access-log-all` and `access-log-all-json` server variants (against
the default, `failures`, in the same run).

    .venv/bin/python -m benchmarks.micro.access_log_cost
"""

import argparse
import logging
import tempfile
import time

import grpc

from orgbilling.server.app import configure_logging
from orgbilling.server.auth.caller import Caller
from orgbilling.server.errors import ServiceError
from orgbilling.server.interceptors.access_log import AccessLogInterceptor

class EndedCall:
    """What the access log reads of a server.interceptors.Call, as a real one has it."""

    class method:
        path = "/orgbilling.v1.CreditService/DeductCredits"

    class context:
        @staticmethod
        def code():
            return None

        @staticmethod
        def cancelled():
            return False

    caller = Caller(principal="apikey:0123456789abcdef", display_name="chat-api",
                    scopes=frozenset({"credits.deduct"}), org_ids=None)
    request_id = "0123456789abcdef0123456789abcdef"

    def __init__(self, failure=None):
        self.failure = failure


def per_line(lines: int) -> None:
    """µs the access log takes per call (its intercept and its end), by mode
    and format; with access_log off it is not in the chain at all."""
    refused = ServiceError(grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", "invalid API key")
    cases = [
        ("failures, a success (no line)", "text", False, None),
        ("failures, a refusal past the rate (counted)", "text", False, refused),
        ("all, a success, text", "text", True, None),
        ("all, a success, json", "json", True, None),
    ]
    print(f"per call, {lines} calls each (µs in the access log, the line written to a file):")
    with tempfile.TemporaryFile("w") as sink:
        for label, log_format, log_successes, failure in cases:
            configure_logging(level="INFO", log_format=log_format)
            logging.getLogger().handlers[0].setStream(sink)
            # failure_lines_per_s=1: nearly every refusal takes the counted path.
            access_log = AccessLogInterceptor(log_successes=log_successes, failure_lines_per_s=1)
            calls = [EndedCall(failure) for _ in range(lines)]
            started = time.perf_counter()
            for call in calls:
                access_log.intercept(call)()
            print(f"  {label:45} {(time.perf_counter() - started) / lines * 1e6:6.2f} µs")
    logging.getLogger().handlers.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=100_000, help="calls measured per case")
    per_line(parser.parse_args().lines)


if __name__ == "__main__":
    main()
