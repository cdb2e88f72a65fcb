"""From the ledger's jsonb results to API messages."""

from google.protobuf.timestamp_pb2 import Timestamp

from orgbilling.v1 import types_pb2


def _timestamp(micros: int | None) -> Timestamp | None:
    if micros is None:
        return None
    stamp = Timestamp()
    stamp.FromMicroseconds(micros)
    return stamp


def enum_value(enum_type, prefix: str, name: str) -> int:
    return enum_type.Value(f"{prefix}_{name}")


def enum_name(enum_type, prefix: str, value: int) -> str:
    return enum_type.Name(value).removeprefix(prefix + "_")


def pool(p: dict) -> types_pb2.CreditPool:
    return types_pb2.CreditPool(
        org_id=p["org_id"],
        total_millicredits=p["total"],
        allocated_millicredits=p["allocated"],
        used_millicredits=p["used"],
        reserved_millicredits=p["reserved"],
        overage_limit_millicredits=p["overage_limit"],
        spendable_millicredits=max(0, p["total"] + p["overage_limit"] - p["used"] - p["reserved"]),
        # Results stored before 0005_overage.sql (replays) have no rate.
        overage_rate_millicents_per_credit=p.get("overage_rate", 0),
        overage_used_millicredits=max(0, p["used"] + p["reserved"] - p["total"]),
        unallocated_millicredits=max(0, p["total"] - p["allocated"]),
        # Results stored before 0007_periods_and_refresh.sql (replays) have no refresh.
        refresh_millicredits=p.get("refresh", 0),
        refresh_overridden=p.get("refresh_overridden", False),
        rollover_cap_millicredits=p.get("rollover_cap", 0),
        refresh_unspent_millicredits=p.get("refresh_unspent", 0),
        next_refresh_time=_timestamp(p.get("next_refresh_at_us")),
    )


def allocation(a: dict) -> types_pb2.Allocation:
    return types_pb2.Allocation(
        org_id=a["org_id"],
        user_id=a["user_id"],
        limit_millicredits=a["limit"],
        used_millicredits=a["used"],
        reserved_millicredits=a["reserved"],
        remaining_millicredits=max(0, a["limit"] - a["used"] - a["reserved"]),
        reset_period=enum_value(types_pb2.ResetPeriod, "RESET_PERIOD", a["reset_period"]),
        next_reset_time=_timestamp(a["next_reset_at_us"]),
        revoked=a["revoked"],
    )


def subscription(s: dict) -> types_pb2.Subscription:
    return types_pb2.Subscription(
        org_id=s["org_id"],
        subscription_id=s["subscription_id"],
        plan=enum_value(types_pb2.Plan, "PLAN", s["plan"]),
        billing_cycle=enum_value(types_pb2.BillingCycle, "BILLING_CYCLE", s["billing_cycle"]),
        status=enum_value(types_pb2.SubscriptionStatus, "SUBSCRIPTION_STATUS", s["status"]),
        price_cents=s["price_cents"],
        currency=s["currency"],
        current_period_start=_timestamp(s["current_period_start_us"]),
        current_period_end=_timestamp(s["current_period_end_us"]),
        trial_end=_timestamp(s["trial_end_us"]),
        external_customer_id=s["external_customer_id"],
        external_subscription_id=s["external_subscription_id"],
        create_time=_timestamp(s["created_at_us"]),
        cancel_time=_timestamp(s["canceled_at_us"]),
    )


def invoice(i: dict) -> types_pb2.Invoice:
    return types_pb2.Invoice(
        org_id=i["org_id"],
        external_invoice_id=i["external_invoice_id"],
        status=enum_value(types_pb2.InvoiceStatus, "INVOICE_STATUS", i["status"]),
        amount_cents=i["amount_cents"],
        currency=i["currency"],
        period_start_time=_timestamp(i["period_start_us"]),
        period_end_time=_timestamp(i["period_end_us"]),
        create_time=_timestamp(i["created_at_us"]),
        update_time=_timestamp(i["updated_at_us"]),
    )


def reservation(r: dict) -> types_pb2.Reservation:
    return types_pb2.Reservation(
        org_id=r["org_id"],
        reservation_id=r["reservation_id"],
        user_id=r["user_id"],
        amount_millicredits=r["amount"],
        state=enum_value(types_pb2.ReservationState, "RESERVATION_STATE", r["state"]),
        service_type=r["service_type"],
        service_name=r["service_name"],
        metadata=r["metadata"],
        create_time=_timestamp(r["created_at_us"]),
        expire_time=_timestamp(r["expires_at_us"]),
        resolve_time=_timestamp(r["resolved_at_us"]),
        committed_millicredits=r["committed"] or 0,
        deduction_id=r["deduction_id"] or "",
    )
