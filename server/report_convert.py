"""From the reports' rows (server.report_store) to ReportingService messages,
and from the requests' times to epoch microseconds."""

import datetime
import json

from google.protobuf.timestamp_pb2 import Timestamp

from orgbilling.v1 import reporting_service_pb2 as pb
from orgbilling.v1 import types_pb2
from orgbilling.server import convert

# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z to
# 9999-12-31T23:59:59.999999999Z.
TIMESTAMP_SECONDS_MIN = -62_135_596_800
TIMESTAMP_SECONDS_MAX = 253_402_300_799
MICROS_MIN = TIMESTAMP_SECONDS_MIN * 1_000_000
MICROS_PER_DAY = 86_400 * 1_000_000

# What one record adds to a message besides its strings (field tags and
# lengths, the amount, the time), rounded up: to keep a page or a chunk
# under the message size limit without measuring it.
_RECORD_BYTES_FIXED = 64


def timestamp(micros: int) -> Timestamp:
    seconds, rest = divmod(micros, 1_000_000)
    return Timestamp(seconds=seconds, nanos=rest * 1000)


def timestamp_micros(stamp: Timestamp) -> int | None:
    """The time in epoch microseconds, or None if it is not a valid
    Timestamp or not a whole number of microseconds."""
    if not (TIMESTAMP_SECONDS_MIN <= stamp.seconds <= TIMESTAMP_SECONDS_MAX
            and 0 <= stamp.nanos < 1_000_000_000 and stamp.nanos % 1000 == 0):
        return None
    return stamp.seconds * 1_000_000 + stamp.nanos // 1000


def day_micros(day: datetime.date) -> int:
    return (day - datetime.date(1970, 1, 1)).days * MICROS_PER_DAY


def time_range(start_us: int, end_us: int) -> pb.TimeRange:
    return pb.TimeRange(start_time=timestamp(start_us), end_time=timestamp(end_us))


def money(currency: str, amount_cents: int) -> pb.Money:
    return pb.Money(currency=currency, amount_cents=amount_cents)


def money_list(by_currency: dict[str, int]) -> list[pb.Money]:
    return [money(currency, cents) for currency, cents in sorted(by_currency.items())]


def enum_or_unspecified(enum_type, prefix: str, name: str | None) -> int:
    return convert.enum_value(enum_type, prefix, name) if name else 0


def plan(name: str | None) -> int:
    return enum_or_unspecified(types_pb2.Plan, "PLAN", name)


def status(name: str | None) -> int:
    return enum_or_unspecified(types_pb2.SubscriptionStatus, "SUBSCRIPTION_STATUS", name)


def usage_totals(used: int, requests: int, active_users: int) -> pb.UsageTotals:
    return pb.UsageTotals(used_millicredits=used, request_count=requests, active_users=active_users)


def add_usage_records(records, org_id: str, rows: list[tuple], *, bytes_max: int) -> int:
    """Appends rows (report_store's usage columns) to the repeated field
    `records`, stopping before the one that would take the message past
    about bytes_max (never before the first); returns how many it added.

    The export's hot loop: a million rows must take seconds, so each record
    is built in one call from plain values."""
    size = 0
    added = 0
    add = records.add
    for deduction_id, user_id, amount, service_type, service_name, request_id, metadata, micros in rows:
        size += (_RECORD_BYTES_FIXED + len(user_id) + len(service_type) + len(service_name)
                 + len(request_id) + len(org_id) + (len(metadata) if metadata else 0))
        if size > bytes_max and added:
            break
        seconds, rest = divmod(micros, 1_000_000)
        record = add(deduction_id=deduction_id, org_id=org_id, user_id=user_id,
                     amount_millicredits=amount, service_type=service_type,
                     service_name=service_name, request_id=request_id,
                     # A dict, not a Timestamp: 0.8 us a record less (measured).
                     create_time={"seconds": seconds, "nanos": rest * 1000})
        if metadata:
            values = json.loads(metadata)
            try:  # the ledger writes string values only: taken as they are
                record.metadata.update(values)
            except TypeError:  # a row written some other way
                record.metadata.update(_metadata(metadata))
        added += 1
    return added


def _metadata(text: str) -> dict[str, str]:
    """A deduction's metadata, a JSON object of strings as written by the
    ledger; any other value shows as its JSON text."""
    return {key: value if isinstance(value, str) else json.dumps(value)
            for key, value in json.loads(text).items()}


def billing_event(org_id: str, row: dict) -> pb.BillingEvent:
    event = pb.BillingEvent(
        event_id=row["event_id"],
        org_id=org_id,
        event_type=convert.enum_value(pb.BillingEventType, "BILLING_EVENT_TYPE", row["event_type"]),
        credits_delta_millicredits=row["credits_delta_millicredits"],
        credit_source=enum_or_unspecified(types_pb2.CreditSource, "CREDIT_SOURCE", row["credit_source"]),
        user_id=row["user_id"] or "",
        subscription_id=row["subscription_id"] or "",
        payment_reference=row["payment_reference"] or "",
        request_id=row["request_id"],
        create_time=timestamp(row["created_at_us"]),
    )
    if row["amount_cents"] is not None:
        event.amount.CopyFrom(money(row["currency"] or "", row["amount_cents"]))
    if row["details"]:
        event.details.update(row["details"])
    return event
