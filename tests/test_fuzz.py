"""Fuzzing of every RPC: generated requests never get INTERNAL or UNKNOWN, a
rejected call writes nothing, and the server stays SERVING.

The RPCs come from the generated descriptors (every *_pb2 module of
orgbilling.v1, plus the health check), and a test checks that server
reflection lists no RPC beyond them: a new RPC is fuzzed without editing
this file. Requests are built from each method's input descriptor:
boundary and overflowing integers, empty, huge, unicode and NUL strings,
missing fields, unknown enum numbers; and raw bytes, most of them not a
message at all, sent with identity serializers.

`make test` runs a few dozen examples per RPC; `make fuzz` runs
--fuzz-examples=N of each kind per RPC and prints the counts.
"""

import collections
import datetime
import importlib
import pkgutil

import grpc
import psycopg
import pytest
from google.protobuf import descriptor as descriptor_module
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import orgbilling.v1
from tests.bank.connect import connect
from tests.fix_server import serve_in_process
from tests.support import admin_token, set_ledger_clock

# Examples per RPC and kind when --fuzz-examples is not given: short enough
# for every `make test`.
DEFAULT_STRUCTURED_EXAMPLES = 40
DEFAULT_RAW_EXAMPLES = 20
CALL_TIMEOUT_S = 10
BUG_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
# Services of the gRPC framework with nothing of ours behind them.
FRAMEWORK_SERVICES = {"grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}

# Values that pass validation, so that generated requests reach the ledger
# and not only the field checks.
FUZZ_ORG = "fuzz-org"
FUZZ_USER = "fuzz-user"
PLAUSIBLE_STRINGS = [FUZZ_ORG, FUZZ_USER, "other-org", "llm", "chat-api", "USD", "key-1",
                     "pay-1", "a", "A" * 128, "A" * 129]


# Which RPCs there are.

def generated_services() -> list[descriptor_module.ServiceDescriptor]:
    """Every service of every generated orgbilling.v1 module, and health."""
    services = [health_pb2.DESCRIPTOR.services_by_name["Health"]]
    for module_info in pkgutil.iter_modules(orgbilling.v1.__path__):
        if module_info.name.endswith("_pb2"):
            module = importlib.import_module(f"orgbilling.v1.{module_info.name}")
            services += module.DESCRIPTOR.services_by_name.values()
    return services


def unary_methods() -> list[descriptor_module.MethodDescriptor]:
    return [method for service in generated_services() for method in service.methods
            if not method.client_streaming and not method.server_streaming]


def method_path(method: descriptor_module.MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


METHODS = unary_methods()


# What to send.

_INT_BOUNDS = {
    "int32": (-2**31, 2**31 - 1), "sint32": (-2**31, 2**31 - 1), "sfixed32": (-2**31, 2**31 - 1),
    "int64": (-2**63, 2**63 - 1), "sint64": (-2**63, 2**63 - 1), "sfixed64": (-2**63, 2**63 - 1),
    "uint32": (0, 2**32 - 1), "fixed32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1), "fixed64": (0, 2**64 - 1),
}
_TYPE_NAMES = {getattr(descriptor_module.FieldDescriptor, name): name[5:].lower()
               for name in dir(descriptor_module.FieldDescriptor) if name.startswith("TYPE_")}


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    """Boundaries, amounts around the 10^15 cap, small numbers, anything."""
    special = [0, 1, -1, 2, 10**15, 10**15 + 1, 10**18, 10**18 + 1, 2**31 - 1, -2**31, 2**31,
               2**53 + 1, 2**63 - 1, -2**63, 2**64 - 1, 1000, 100, 10, 365, 366]
    return st.one_of(
        st.sampled_from([n for n in special if low <= n <= high]),
        st.integers(max(low, -1000), min(high, 1000)),
        st.integers(low, high),
    )


def huge_text() -> st.SearchStrategy[str]:
    # Built from a length, not drawn character by character: fast at 100k.
    return st.tuples(st.sampled_from(["a", "é", "\x00", "字", "🙂", "-"]),
                     st.integers(129, 200_000)).map(lambda pair: pair[0] * pair[1])


def texts() -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(""),
        st.sampled_from(PLAUSIBLE_STRINGS),
        st.from_regex(r"[A-Za-z0-9._:@-]{1,140}", fullmatch=True),
        st.text(max_size=40),
        st.text(alphabet=st.sampled_from("\x00\x01\n\t \u200b\ufeff\u202eé字🙂'\";%_\\"), max_size=20),
        huge_text(),
    )


def enum_numbers(field) -> st.SearchStrategy[int]:
    valid = [value.number for value in field.enum_type.values]
    return st.one_of(st.sampled_from(valid), integers(-2**31, 2**31 - 1))


def scalar(field, depth: int) -> st.SearchStrategy:
    kind = _TYPE_NAMES[field.type]
    if kind in _INT_BOUNDS:
        return integers(*_INT_BOUNDS[kind])
    if kind == "bool":
        return st.booleans()
    if kind in ("double", "float"):
        return st.floats(width=32 if kind == "float" else 64)
    if kind == "string":
        return texts()
    if kind == "bytes":
        return st.binary(max_size=64)
    if kind == "enum":
        return enum_numbers(field)
    if kind == "message":
        return messages(field.message_type, depth + 1)
    raise AssertionError(f"no strategy for {kind} field {field.full_name}")


def is_map(field) -> bool:
    return (field.type == field.TYPE_MESSAGE and field.message_type.GetOptions().map_entry)


def field_values(field, depth: int) -> st.SearchStrategy:
    if is_map(field):
        key_field, value_field = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        return st.dictionaries(scalar(key_field, depth), scalar(value_field, depth), max_size=40)
    if field.is_repeated:
        # Mostly short lists; sometimes past any sane batch limit.
        return st.one_of(st.lists(scalar(field, depth), max_size=5),
                         st.integers(1001, 1500).flatmap(
                             lambda n: st.lists(scalar(field, depth), min_size=n, max_size=n)))
    return scalar(field, depth)


def messages(message_descriptor, depth: int = 0) -> st.SearchStrategy:
    """Requests of this type with any subset of fields set (a missing field
    is the caller's omission), nested messages down to a few levels."""
    message_class = message_factory.GetMessageClass(message_descriptor)
    if depth > 3:
        return st.just(message_class())
    optional = {field.name: st.deferred(lambda field=field: field_values(field, depth))
                for field in message_descriptor.fields}
    return st.fixed_dictionaries({}, optional=optional).map(
        lambda values: build(message_class, message_descriptor, values))


# Plausible requests: every field set to something that could pass
# validation, guessed from its name and type, so that the fuzzer also
# reaches the ledger and not only the field checks.

def plausible_text(field) -> st.SearchStrategy[str]:
    name = field.name
    if name == "org_id":
        return st.sampled_from([FUZZ_ORG, FUZZ_ORG, "other-org"])
    if name == "user_id":
        return st.sampled_from([FUZZ_USER, FUZZ_USER, "other-user"])
    if name in ("currency",):
        return st.sampled_from(["USD", "EUR"])
    if name == "service_type":
        return st.sampled_from(["llm", "search"])
    if name.endswith("_token"):
        return st.sampled_from(["", "bm90IGEgdG9rZW4=", "WyJmdXp6LW9yZyIsICIiXQ=="])
    return st.from_regex(r"[a-z0-9-]{1,24}", fullmatch=True)


def plausible_scalar(field, depth: int) -> st.SearchStrategy:
    kind = _TYPE_NAMES[field.type]
    if kind in _INT_BOUNDS:
        low, high = _INT_BOUNDS[kind]
        return st.one_of(st.integers(1, 30), st.integers(1, 5000),
                         st.sampled_from([n for n in (0, 10**15, 10**9) if low <= n <= high]))
    if kind == "string":
        return plausible_text(field)
    if kind == "enum":  # the zero value is UNSPECIFIED, which the wild requests cover
        numbers = [value.number for value in field.enum_type.values]
        return st.sampled_from([n for n in numbers if n] or numbers)
    if kind == "message" and not is_map(field):
        return plausible_messages(field.message_type, depth + 1)
    return scalar(field, depth)


def plausible_values(field, depth: int) -> st.SearchStrategy:
    if is_map(field):
        return st.dictionaries(st.from_regex(r"[a-z]{1,8}", fullmatch=True),
                               st.from_regex(r"[a-z0-9]{0,8}", fullmatch=True), max_size=3)
    if field.is_repeated:
        return st.lists(plausible_scalar(field, depth), max_size=4)
    return plausible_scalar(field, depth)


def plausible_messages(message_descriptor, depth: int = 0) -> st.SearchStrategy:
    message_class = message_factory.GetMessageClass(message_descriptor)
    if depth > 3:
        return st.just(message_class())
    # Identifiers always, the rest often: many fields only make sense in
    # some combinations (a payment reference only with a purchase).
    fields = {field.name: st.deferred(lambda field=field: plausible_values(field, depth))
              for field in message_descriptor.fields}
    required = {name: value for name, value in fields.items() if is_identifier(name)}
    optional = {name: value for name, value in fields.items() if not is_identifier(name)}
    return st.fixed_dictionaries(required, optional=optional).map(
        lambda values: build(message_class, message_descriptor, values))


def is_identifier(field_name: str) -> bool:
    return field_name.endswith("_id") or field_name == "idempotency_key"


def requests(message_descriptor) -> st.SearchStrategy:
    return st.one_of(plausible_messages(message_descriptor), messages(message_descriptor))


def build(message_class, message_descriptor, values: dict):
    message = message_class()
    for name, value in values.items():
        field = message_descriptor.fields_by_name[name]
        target = getattr(message, name)
        if is_map(field):
            if field.message_type.fields_by_name["value"].type == field.TYPE_MESSAGE:
                for key, item in value.items():
                    target[key].CopyFrom(item)
            else:
                target.update(value)
        elif field.is_repeated:
            target.extend(value)
        elif field.type == field.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def raw_bytes(method) -> st.SearchStrategy[bytes]:
    """Random bytes, and valid encodings cut short or with bytes flipped."""
    message_class = message_factory.GetMessageClass(method.input_type)

    def mangle(encoded: bytes, position: int, byte: int, cut: bool) -> bytes:
        if not encoded:
            return bytes([byte])
        position %= len(encoded)
        if cut:
            return encoded[:position]
        return encoded[:position] + bytes([byte]) + encoded[position + 1:]

    encodings = requests(method.input_type).map(lambda m: m.SerializeToString()).filter(
        lambda encoded: len(encoded) < 1_000_000)
    return st.one_of(
        st.binary(max_size=256),
        st.builds(mangle, encodings, st.integers(0, 10**6), st.integers(0, 255), st.booleans()),
        st.sampled_from([b"\xff" * 10, b"\x0a\xff\xff\xff\xff\x0f", b"\x08" + b"\x80" * 11,
                         message_class(), b"\x00", b"\x07"]).map(
            lambda value: value if isinstance(value, bytes) else value.SerializeToString()),
    )


def decodes(method, data: bytes) -> bool:
    """Whether the server can turn these bytes into a request at all."""
    try:
        message_factory.GetMessageClass(method.input_type).FromString(data)
        return True
    except Exception:  # noqa: BLE001: DecodeError and friends
        return False


# Against a real server.

def ledger_fingerprint(conn: psycopg.Connection, answer_keys: frozenset[str] = frozenset()) -> dict[str, str]:
    """A digest of every row of every table: any write changes it. Except a
    refusal stored under the refused call's own idempotency key (its answer,
    migrations/functions/20_idempotency.sql, so that a late attempt with that key cannot be applied
    after the caller was told no): that row is not a write to the ledger."""
    tables = [name for (name,) in conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")]
    digests = {}
    for table in tables:
        answers_excluded = table == "idempotency_records" and answer_keys
        digests[table] = conn.execute(
            f"SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, ',' ORDER BY t::text)), '')"
            f" FROM {table} t"
            + (" WHERE NOT (t.idempotency_key = ANY(%s) AND t.result ->> 'outcome' <> 'OK')"
               if answers_excluded else ""),
            (list(answer_keys),) if answers_excluded else None,
        ).fetchone()[0]
    return digests


def idempotency_keys_in(message) -> frozenset[str]:
    """Every idempotency_key a request carries, a batch's items' included."""
    keys = set()
    for field, value in message.ListFields():
        if field.name == "idempotency_key" and "\x00" not in value:  # NUL: never stored
            keys.add(value)
        elif field.type == field.TYPE_MESSAGE and not is_map(field):
            for item in (value if field.is_repeated else [value]):
                keys |= idempotency_keys_in(item)
    return frozenset(keys)


def idempotency_keys_in_bytes(method, data: bytes) -> frozenset[str]:
    try:
        return idempotency_keys_in(message_factory.GetMessageClass(method.input_type).FromString(data))
    except Exception:  # noqa: BLE001: not a message: it carries no key
        return frozenset()


class FuzzTarget:
    """One server over its own database, with an org and a user that exist,
    so generated requests reach deep paths."""

    def __init__(self, postgres):
        self.database_url = postgres.new_database()
        # The ledger's clock stands still for the whole run: what falls due
        # with time (a hold's expiry, a period's end) is applied by whichever
        # call touches the org first, a refused one too (by design: lock_pool,
        # migrations/functions/35_reservations.sql). Frozen, nothing falls due
        # between the fingerprint and the call, so any write is the call's.
        set_ledger_clock(self.database_url, datetime.datetime.now(datetime.timezone.utc))
        token = admin_token(self.database_url)
        self.server = serve_in_process(self.database_url)
        self.connection = connect(f"127.0.0.1:{self.server.port}", token)
        self.db = psycopg.connect(self.database_url, autocommit=True)
        self.counts: collections.Counter[str] = collections.Counter()
        self._seed_accounts()

    def _seed_accounts(self) -> None:
        from orgbilling.v1 import org_billing_service_pb2 as billing_pb
        from orgbilling.v1 import types_pb2

        billing, metadata = self.connection.billing, self.connection.metadata
        billing.CreateSubscription(billing_pb.CreateSubscriptionRequest(
            org_id=FUZZ_ORG, plan=types_pb2.PLAN_BYOK, billing_cycle=types_pb2.BILLING_CYCLE_MONTHLY,
            idempotency_key="fuzz-setup-1"), metadata=metadata, timeout=10)
        billing.AddCredits(billing_pb.AddCreditsRequest(
            org_id=FUZZ_ORG, source=types_pb2.CREDIT_SOURCE_GRANT, amount_millicredits=10**12,
            idempotency_key="fuzz-setup-2"), metadata=metadata, timeout=10)
        billing.AllocateCredits(billing_pb.AllocateCreditsRequest(
            org_id=FUZZ_ORG, user_id=FUZZ_USER, limit_millicredits=10**9,
            reset_period=types_pb2.RESET_PERIOD_MONTHLY, idempotency_key="fuzz-setup-3"),
            metadata=metadata, timeout=10)

    def call_raw(self, method, data: bytes):
        """Sends bytes as they are; returns (code, details) of the answer."""
        call = self.connection.channel.unary_unary(
            method_path(method), request_serializer=None, response_deserializer=None)
        try:
            call(data, timeout=CALL_TIMEOUT_S, metadata=self.connection.metadata)
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as error:
            return error.code(), error.details()

    def is_serving(self) -> bool:
        response = self.connection.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        return response.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self.connection.close()
        self.db.close()
        self.server.stop()


@pytest.fixture(scope="module")
def fuzz_target(postgres, request):
    target = FuzzTarget(postgres)
    yield target
    target.close()
    print_counts(request.config, target.counts)


def print_counts(config, counts: collections.Counter) -> None:
    """Requests per RPC and the codes they got, past pytest's capture."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line("fuzz requests per RPC, with the codes they got:")
        for method in METHODS:
            path = method_path(method)
            reporter.write_line(f"  {path}: " + "; ".join(
                f"{kind} {sum(n for (p, k, _), n in counts.items() if (p, k) == (path, kind))}"
                f" ({', '.join(f'{code} {n}' for (p, k, code), n in sorted(counts.items()) if (p, k) == (path, kind))})"
                for kind in ("structured", "raw decodable", "raw undecodable")))


def examples(request, default: int) -> int:
    return request.config.getoption("--fuzz-examples", default=None) or default


def fuzz_settings(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


def assert_rejection_harmless(target: FuzzTarget, method, before, code, details, decodable: bool,
                              answer_keys: frozenset[str]):
    assert code not in BUG_CODES, f"{method_path(method)}: {code.name}: {details}"
    if not decodable:
        assert code is grpc.StatusCode.INVALID_ARGUMENT, f"{method_path(method)}: {code.name}: {details}"
    if code is not grpc.StatusCode.OK:
        assert ledger_fingerprint(target.db, answer_keys) == before, \
            f"{method_path(method)} was refused with {code.name} but wrote: {details}"
    assert target.is_serving()


@pytest.mark.parametrize("method", METHODS, ids=method_path)
def test_generated_requests_never_get_internal_or_write_when_refused(method, fuzz_target, request):
    """Every generated request gets a designed answer; a refusal changes no row."""

    @fuzz_settings(examples(request, DEFAULT_STRUCTURED_EXAMPLES))
    @given(requests(method.input_type))
    def send(message):
        answer_keys = idempotency_keys_in(message)
        before = ledger_fingerprint(fuzz_target.db, answer_keys)
        code, details = fuzz_target.call_raw(method, message.SerializeToString())
        fuzz_target.counts[method_path(method), "structured", code.name] += 1
        assert_rejection_harmless(fuzz_target, method, before, code, details, True, answer_keys)

    send()


@pytest.mark.parametrize("method", METHODS, ids=method_path)
def test_raw_bytes_never_get_internal_when_decodable_and_never_write_when_refused(
        method, fuzz_target, request):
    """Bytes that are not a message get INVALID_ARGUMENT (after
    authentication, never INTERNAL); bytes that happen to decode are held to
    the same rules as any request."""

    @fuzz_settings(examples(request, DEFAULT_RAW_EXAMPLES))
    @given(raw_bytes(method))
    def send(data):
        answer_keys = idempotency_keys_in_bytes(method, data)
        before = ledger_fingerprint(fuzz_target.db, answer_keys)
        code, details = fuzz_target.call_raw(method, data)
        decodable = decodes(method, data)
        kind = "raw decodable" if decodable else "raw undecodable"
        fuzz_target.counts[method_path(method), kind, code.name] += 1
        assert_rejection_harmless(fuzz_target, method, before, code, details, decodable, answer_keys)

    send()


def test_every_rpc_the_server_reflects_is_fuzzed(fuzz_target):
    """A service added to the server but not to the generated code would
    escape the fuzzer: reflection must list nothing beyond METHODS."""
    reflected = ProtoReflectionDescriptorDatabase(fuzz_target.connection.channel)
    pool = descriptor_pool.DescriptorPool(reflected)
    served = {f"/{name}/{method.name}"
              for name in reflected.get_services() if name not in FRAMEWORK_SERVICES
              for method in pool.FindServiceByName(name).methods
              if not method.client_streaming and not method.server_streaming}
    assert served, "reflection lists no RPC"
    assert served <= {method_path(method) for method in METHODS}
