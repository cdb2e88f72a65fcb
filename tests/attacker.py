"""An anonymous attacker of an orgbilling server, and a load generator of
authenticated callers, each meant to run in a process of its own so that its
CPU and GIL do not distort the latencies a test measures.

Run as `python -m tests.attacker --address HOST:PORT --duration-s S --out FILE
[--stalled N] [--reflection N] [--watches N] [--cancel-threads T] ...`; it
prints "started" once every part is under way, attacks for S seconds, stops
everything and writes what it saw as JSON to FILE. `AttackerProcess` does
that from a test. The attack parts (each a function here):

- stalled_unary_requests: calls that send their headers and never their
  request message, so that the server's unary handler waits for it;
- open_reflection_streams: reflection streams that send one request and
  then stay silent;
- held_watch_streams: health Watch streams held open;
- watch_and_cancel_loops: threads that open a Watch and cancel it at once,
  over and over.

Every part keeps its number of calls open: when one ends it opens another
(after 100 ms when it was refused; an attacker need not honour RetryInfo).
Every loop ends when `stop` is set; everything is loopback.
"""

import argparse
import collections
import contextlib
import json
import os
import resource
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from tests.support import REPO, status_details

DEDUCT_CREDITS = "/orgbilling.v1.CreditService/DeductCredits"
REFLECTION_INFO = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
REFUSED_PAUSE_S = 0.1

# Each channel its own connection (channels to one target otherwise share
# one), reconnecting at once after the server closes one.
CHANNEL_OPTIONS = (
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)


def new_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=list(CHANNEL_OPTIONS))


def describe(error: grpc.RpcError) -> str:
    """CODE/REASON/retry (or /no-retry) of a failed call: what the server said."""
    code = error.code().name if error.code() else "NONE"
    try:
        infos = status_details(error, error_details_pb2.ErrorInfo)
        retries = status_details(error, error_details_pb2.RetryInfo)
    except Exception:  # noqa: BLE001: a malformed status is what it is
        infos = retries = []
    reason = infos[-1].reason if infos else "-"
    return f"{code}/{reason}/{'retry' if retries else 'no-retry'}"


class Calls:
    """The calls a part has in flight, so that stopping cancels them all."""

    def __init__(self):
        self._lock = threading.Lock()
        self._calls = set()
        self._closed = False

    def add(self, call) -> bool:
        """Remembers `call`; False (and cancels it) once closed."""
        with self._lock:
            if not self._closed:
                self._calls.add(call)
                return True
        call.cancel()
        return False

    def discard(self, call) -> None:
        with self._lock:
            self._calls.discard(call)

    def cancel_all(self) -> None:
        with self._lock:
            self._closed = True
            calls = list(self._calls)
        for call in calls:
            call.cancel()


class Stats:
    """What one part saw, counted under a lock; streams of several parts
    may share `open_streams` to count those open at once across parts."""

    def __init__(self, open_streams: "OpenStreams | None" = None):
        self._lock = threading.Lock()
        self.counts = collections.Counter()
        self.outcomes = collections.Counter()
        self.lifetimes_s: list[float] = []          # calls the server ended
        self.lifetimes_at_end_s: list[float] = []   # calls still open when we stopped
        self.open_streams = open_streams

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def outcome(self, what: str) -> None:
        with self._lock:
            self.outcomes[what] += 1

    def lifetime(self, seconds: float, at_end: bool) -> None:
        with self._lock:
            (self.lifetimes_at_end_s if at_end else self.lifetimes_s).append(round(seconds, 3))

    def report(self) -> dict:
        with self._lock:
            return {
                "counts": dict(self.counts), "outcomes": dict(self.outcomes),
                "lifetimes_s": sorted(self.lifetimes_s),
                "lifetimes_at_end_s": sorted(self.lifetimes_at_end_s),
            }


class OpenStreams:
    """Streams open now (their first answer received, their end not yet
    seen) and the most ever open at once."""

    def __init__(self):
        self._lock = threading.Lock()
        self.now = 0
        self.max = 0
        self.settled = 0  # streams whose first attempt was answered (opened or refused)

    def first_answer(self) -> None:
        with self._lock:
            self.settled += 1

    def opened(self) -> None:
        with self._lock:
            self.now += 1
            self.max = max(self.max, self.now)

    def closed(self) -> None:
        with self._lock:
            self.now -= 1


class Part:
    """Threads of one attack part, its channels, its calls and its stats."""

    def __init__(self, name: str, stats: Stats):
        self.name = name
        self.stats = stats
        self.calls = Calls()
        self.channels: list[grpc.Channel] = []
        self.threads: list[threading.Thread] = []

    def start(self, target, count: int) -> "Part":
        for index in range(count):
            thread = threading.Thread(target=target, args=(index,), name=f"{self.name}-{index}",
                                      daemon=True)
            self.threads.append(thread)
            thread.start()
        return self

    def stop(self, timeout_s: float) -> None:
        """Cancels every call in flight, joins the threads, closes the channels."""
        self.calls.cancel_all()
        deadline = time.monotonic() + timeout_s
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.stats.count("threads_still_running", sum(t.is_alive() for t in self.threads))
        for channel in self.channels:
            channel.close()


def stalled_unary_requests(address: str, count: int, channels: int, stop: threading.Event) -> Part:
    """Keeps `count` DeductCredits calls open that send headers and never the
    request message, spread over `channels` connections; when the server
    ends one, opens another. Records each call's lifetime and how it ended."""
    part = Part("stalled", Stats())
    part.channels = [new_channel(address) for _ in range(channels)]
    methods = [channel.stream_unary(DEDUCT_CREDITS, request_serializer=None,
                                    response_deserializer=None) for channel in part.channels]

    def slot(index: int) -> None:
        method = methods[index % len(methods)]
        while not stop.is_set():
            ended = threading.Event()

            def never_a_message():
                # Blocks until the call is over (or the attack): no message, ever.
                ended.wait()
                return
                yield  # noqa: unreachable: makes this a generator

            started = time.monotonic()
            future = method.future(never_a_message())
            future.add_done_callback(lambda _: ended.set())
            part.stats.count("calls")
            if not part.calls.add(future):
                ended.set()
                return
            while not ended.wait(0.5):
                if stop.is_set():
                    future.cancel()
            lifetime = time.monotonic() - started
            part.calls.discard(future)
            if future.cancelled() or (stop.is_set() and future.code() is grpc.StatusCode.CANCELLED):
                part.stats.lifetime(lifetime, at_end=True)
                return
            part.stats.lifetime(lifetime, at_end=False)
            part.stats.count("ended_by_server")
            code = future.code()
            part.stats.outcome(code.name if code else "NONE")

    return part.start(slot, count)


def _held_streams(name: str, address: str, count: int, channels: int, stop: threading.Event,
                  open_streams: OpenStreams, open_call) -> Part:
    """Keeps `count` streams open, each made by open_call(channel, ended
    event) -> call; the first answer means open. Reopens one that ends,
    after REFUSED_PAUSE_S when it was refused."""
    part = Part(name, Stats(open_streams))
    part.channels = [new_channel(address) for _ in range(channels)]

    def slot(index: int) -> None:
        channel = part.channels[index % len(part.channels)]
        first_attempt = True
        while not stop.is_set():
            ended = threading.Event()
            call = open_call(channel, ended)
            call.add_done_callback(lambda _: ended.set())
            part.stats.count("attempts")
            if not part.calls.add(call):
                return
            opened_at = None
            try:
                next(call)
                opened_at = time.monotonic()
                open_streams.opened()
                if first_attempt:
                    open_streams.first_answer()
                    first_attempt = False
                part.stats.count("opened")
                for _ in call:
                    pass
                outcome = "OK"
            except StopIteration:
                outcome = "OK"
            except grpc.RpcError as error:
                outcome = describe(error)
            finally:
                if opened_at is not None:
                    open_streams.closed()
                elif first_attempt:
                    open_streams.first_answer()
                    first_attempt = False
                ended.set()
                part.calls.discard(call)
            at_end = stop.is_set() and outcome.startswith("CANCELLED")
            if opened_at is None:
                if not at_end:
                    part.stats.outcome("refused " + outcome)
                    stop.wait(REFUSED_PAUSE_S)
                continue
            part.stats.lifetime(time.monotonic() - opened_at, at_end=at_end)
            if not at_end:
                part.stats.outcome("ended " + outcome)

    return part.start(slot, count)


def open_reflection_streams(address: str, count: int, channels: int, stop: threading.Event,
                            open_streams: OpenStreams) -> Part:
    """Keeps `count` reflection streams open, each having sent one valid
    request (list services) and then nothing."""

    def open_call(channel: grpc.Channel, ended: threading.Event):
        method = channel.stream_stream(
            REFLECTION_INFO,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)

        def one_request_then_silence():
            yield reflection_pb2.ServerReflectionRequest(list_services="")
            ended.wait()

        return method(one_request_then_silence())

    return _held_streams("reflection", address, count, channels, stop, open_streams, open_call)


def held_watch_streams(address: str, count: int, channels: int, stop: threading.Event,
                       open_streams: OpenStreams, service: str = "") -> Part:
    """Keeps `count` health Watch streams open, each iterated in a thread."""

    def open_call(channel: grpc.Channel, ended: threading.Event):
        return health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service))

    return _held_streams("watch", address, count, channels, stop, open_streams, open_call)


def watch_and_cancel_loops(address: str, threads: int, stop: threading.Event) -> Part:
    """`threads` threads, each opening a Watch and cancelling it at once, in a loop."""
    part = Part("watch-cancel", Stats())
    part.channels = [new_channel(address) for _ in range(threads)]

    def loop(index: int) -> None:
        stub = health_pb2_grpc.HealthStub(part.channels[index])
        while not stop.is_set():
            try:
                call = stub.Watch(health_pb2.HealthCheckRequest())
                call.cancel()
                part.stats.count("loops")
            except Exception as error:  # noqa: BLE001: counted, the loop goes on
                part.stats.outcome(f"error {type(error).__name__}")
                stop.wait(REFUSED_PAUSE_S)

    return part.start(loop, threads)


def attack(address: str, duration_s: float, *, stalled: int = 0, stalled_channels: int = 4,
           reflection: int = 0, reflection_channels: int = 2, watches: int = 0,
           watch_channels: int = 2, cancel_threads: int = 0,
           started=lambda: None) -> dict:
    """Runs the parts asked for, all at once; calls `started` once they are
    under way (every held stream opened or refused, or 5 s passed), and
    attacks for duration_s from then."""
    stop = threading.Event()
    open_streams = OpenStreams()
    parts: list[Part] = []
    began = time.monotonic()
    try:
        if stalled:
            parts.append(stalled_unary_requests(address, stalled, stalled_channels, stop))
        if reflection:
            parts.append(open_reflection_streams(address, reflection, reflection_channels, stop,
                                                 open_streams))
        if watches:
            parts.append(held_watch_streams(address, watches, watch_channels, stop, open_streams))
        if cancel_threads:
            parts.append(watch_and_cancel_loops(address, cancel_threads, stop))
        # Under way once every held stream's first attempt was answered
        # (opened or refused); the duration counts from then.
        ready_by = time.monotonic() + 5
        while open_streams.settled < reflection + watches and time.monotonic() < ready_by:
            time.sleep(0.05)
        started()
        stop.wait(duration_s)
    finally:
        stop.set()
        for part in parts:
            part.stop(timeout_s=10)
    return {
        "duration_s": round(time.monotonic() - began, 3),
        "open_streams_max": open_streams.max,
        "parts": {part.name: part.stats.report() for part in parts},
    }


def authenticated_callers(address: str, token: str, threads: int, duration_s: float,
                          deadline_s: float, org_id: str, user_id: str, channels: int = 4,
                          started=lambda: None) -> dict:
    """`threads` threads sending DeductCredits (amount 1, a new key each)
    as fast as they can for duration_s, each with a deadline of deadline_s;
    counts the outcomes and the longest call."""
    from orgbilling.v1 import credit_service_pb2, credit_service_pb2_grpc
    import uuid

    metadata = (("authorization", f"Bearer {token}"),)
    opened = [new_channel(address) for _ in range(channels)]
    stubs = [credit_service_pb2_grpc.CreditServiceStub(channel) for channel in opened]
    stop = threading.Event()
    lock = threading.Lock()
    outcomes = collections.Counter()
    longest = {"s": 0.0, "outcome": None}

    def caller(index: int) -> None:
        stub = stubs[index % len(stubs)]
        while not stop.is_set():
            request = credit_service_pb2.DeductCreditsRequest(
                org_id=org_id, user_id=user_id, amount_millicredits=1, service_type="llm",
                service_name="overload", idempotency_key=uuid.uuid4().hex)
            began = time.monotonic()
            try:
                stub.DeductCredits(request, metadata=metadata, timeout=deadline_s)
                outcome = "OK"
            except grpc.RpcError as error:
                outcome = describe(error)
            seconds = time.monotonic() - began
            with lock:
                outcomes[outcome] += 1
                if seconds > longest["s"]:
                    longest.update(s=round(seconds, 3), outcome=outcome)

    workers = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    started()
    stop.wait(duration_s)
    stop.set()
    for worker in workers:
        worker.join(deadline_s + 5)
    for channel in opened:
        channel.close()
    return {"outcomes": dict(outcomes), "longest_call": longest,
            "threads_still_running": sum(w.is_alive() for w in workers)}


class AttackerProcess:
    """`python -m tests.attacker ...` as a process of its own: start() waits
    until it says it has started; result() waits for its JSON report."""

    def __init__(self, address: str, duration_s: float, out_path: Path, **options):
        self.duration_s = duration_s
        self.out_path = Path(out_path)
        self.arguments = [sys.executable, "-m", "tests.attacker", "--address", address,
                          "--duration-s", str(duration_s), "--out", str(self.out_path)]
        for name, value in options.items():
            self.arguments += ["--" + name.replace("_", "-"), str(value)]
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30) -> "AttackerProcess":
        self.process = subprocess.Popen(self.arguments, cwd=REPO, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None:
                self.kill()
                raise RuntimeError(f"the attacker did not start: {self.stderr()}")
            readable, _, _ = select.select([self.process.stdout], [], [], remaining)
            if readable:
                line += os.read(self.process.stdout.fileno(), 1)
        assert line.strip() == b"started", line
        return self

    def result(self, timeout_s: float | None = None) -> dict:
        """Its report, once it has finished (killed after timeout_s, by default
        its duration + 30 s)."""
        timeout_s = self.duration_s + 30 if timeout_s is None else timeout_s
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the attacker did not end within {timeout_s} s") from None
        assert code == 0, f"the attacker exited with {code}: {self.stderr()}"
        return json.loads(self.out_path.read_text())

    def stderr(self) -> str:
        with contextlib.suppress(Exception):
            return self.process.stderr.read().decode(errors="replace")[-3000:]
        return ""

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> "AttackerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
        for stream in (self.process.stdout, self.process.stderr):
            stream.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.attacker")
    parser.add_argument("--address", required=True)
    parser.add_argument("--duration-s", type=float, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stalled", type=int, default=0)
    parser.add_argument("--stalled-channels", type=int, default=4)
    parser.add_argument("--reflection", type=int, default=0)
    parser.add_argument("--reflection-channels", type=int, default=2)
    parser.add_argument("--watches", type=int, default=0)
    parser.add_argument("--watch-channels", type=int, default=2)
    parser.add_argument("--cancel-threads", type=int, default=0)
    # Not an attack: authenticated callers as fast as they can (overload).
    parser.add_argument("--callers", type=int, default=0)
    parser.add_argument("--token", default="")
    parser.add_argument("--deadline-s", type=float, default=5.0)
    parser.add_argument("--org-id", default="")
    parser.add_argument("--user-id", default="")
    args = parser.parse_args(argv)

    def started() -> None:
        print("started", flush=True)

    if args.callers:
        report = authenticated_callers(args.address, args.token, args.callers, args.duration_s,
                                       args.deadline_s, args.org_id, args.user_id, started=started)
    else:
        report = attack(
            args.address, args.duration_s, stalled=args.stalled,
            stalled_channels=args.stalled_channels, reflection=args.reflection,
            reflection_channels=args.reflection_channels, watches=args.watches,
            watch_channels=args.watch_channels, cancel_threads=args.cancel_threads,
            started=started)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 3)  # this process's CPU, all of it
    Path(args.out).write_text(json.dumps(report))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gRPC's own threads must not keep the process alive


if __name__ == "__main__":
    main()
