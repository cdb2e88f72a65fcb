"""Every RPC of the contract, written once for both clients. Each method
builds its request (with the operation's one idempotency key) and hands it
to `self._invoke`, which the sync client runs to a result and the async
client returns as a coroutine: so `client.deduct_credits(...)` and
`await client.deduct_credits(...)` share this code."""

from __future__ import annotations

import dataclasses
import datetime
import re
import uuid
from collections.abc import Mapping, Sequence
from functools import partial

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from orgbilling.client import results
from orgbilling.client.errors import make_error
from orgbilling.v1 import (
    credit_service_pb2,
    credit_service_pb2_grpc,
    org_billing_service_pb2,
    org_billing_service_pb2_grpc,
    reporting_service_pb2,
    reporting_service_pb2_grpc,
)

credit_pb = credit_service_pb2

STUBS = {
    "CreditService": credit_service_pb2_grpc.CreditServiceStub,
    "OrgBillingService": org_billing_service_pb2_grpc.OrgBillingServiceStub,
    "ReportingService": reporting_service_pb2_grpc.ReportingServiceStub,
}
SERVICE_DESCRIPTORS = {
    "CreditService": credit_service_pb2.DESCRIPTOR.services_by_name["CreditService"],
    "OrgBillingService": org_billing_service_pb2.DESCRIPTOR.services_by_name["OrgBillingService"],
    "ReportingService": reporting_service_pb2.DESCRIPTOR.services_by_name["ReportingService"],
}


def new_idempotency_key() -> str:
    return uuid.uuid4().hex


def method_name(rpc: str) -> str:
    """DeductCreditsBatch -> deduct_credits_batch."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", rpc).lower()


def _check(response, request_id) -> results.Check:
    return results.Check(
        sufficient=response.sufficient,
        allocation_remaining_millicredits=response.allocation_remaining_millicredits,
        pool_spendable_millicredits=response.pool_spendable_millicredits,
        request_id=request_id,
    )


def _answer(result_class: type[results.Answer], key: str):
    """The decoder of a response into `result_class`: each of its fields
    from the response's field of the same name (timestamps as UTC
    datetimes), and the key and request ID the call adds."""
    names = [field.name for field in dataclasses.fields(result_class)
             if field.name not in ("idempotency_key", "request_id")]

    def decode(response, request_id):
        values = {name: getattr(response, name) for name in names}
        for name, value in values.items():
            if isinstance(value, timestamp_pb2.Timestamp):
                values[name] = value.ToDatetime(tzinfo=datetime.timezone.utc)
        return result_class(**values, idempotency_key=key, request_id=request_id)
    return decode


def _batch(keys: list[str], response, request_id) -> results.BatchDeductions:
    items = []
    for key, result in zip(keys, response.results, strict=True):
        if result.HasField("deduction"):
            items.append(_answer(results.Deduction, key)(result.deduction, request_id))
        else:
            error = make_error(_CODES.get(result.error.code, grpc.StatusCode.UNKNOWN),
                               result.error.reason, result.error.message,
                               metadata=dict(result.error.metadata), request_id=request_id)
            error.idempotency_key = key
            items.append(error)
    return results.BatchDeductions(items=tuple(items), request_id=request_id)


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _result(key: str | None, response, request_id) -> results.Result:
    replayed = bool(getattr(response, "replayed", False))
    return results.Result(response=response, replayed=replayed, idempotency_key=key,
                          request_id=request_id)


def _duration(seconds: float | None) -> duration_pb2.Duration | None:
    if seconds is None:
        return None
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def deduction_request(*, org_id: str, user_id: str, amount_millicredits: int, service_type: str,
                      service_name: str, idempotency_key: str | None = None,
                      metadata: Mapping[str, str] | None = None) -> credit_pb.DeductCreditsRequest:
    """One deduction, for deduct_credits_batch; a new key unless given."""
    return credit_pb.DeductCreditsRequest(
        org_id=org_id, user_id=user_id, amount_millicredits=amount_millicredits,
        service_type=service_type, service_name=service_name,
        idempotency_key=idempotency_key or new_idempotency_key(), metadata=metadata or {},
    )


def export_request(*, org_id: str, time_range, chunk_size: int,
                   resume_token: str) -> reporting_service_pb2.ExportUsageRequest:
    """ExportUsage's request, sent again with the last chunk's resume_token
    after a cut (both clients' export_usage)."""
    return reporting_service_pb2.ExportUsageRequest(
        org_id=org_id, time_range=time_range, chunk_size=chunk_size, resume_token=resume_token)


class Operations:
    """The RPCs. Subclasses provide `_invoke(service, rpc, request, decode,
    *, timeout_s, idempotency_key)` and `reserve`. Every method takes
    keyword arguments only, and `timeout_s` (each attempt's deadline; the
    client's default when None)."""

    def _invoke(self, service, rpc, request, decode, *, timeout_s, idempotency_key):
        raise NotImplementedError

    # The charging path, with typed results.

    def check_credits(self, *, org_id: str, user_id: str, amount_millicredits: int,
                      timeout_s: float | None = None):
        """Whether `amount_millicredits` fits the user's allocation and the
        pool now (-> Check). Changes nothing."""
        request = credit_pb.CheckCreditsRequest(
            org_id=org_id, user_id=user_id, amount_millicredits=amount_millicredits)
        return self._invoke("CreditService", "CheckCredits", request, _check,
                            timeout_s=timeout_s, idempotency_key=None)

    def deduct_credits(self, *, org_id: str, user_id: str, amount_millicredits: int,
                       service_type: str, service_name: str, idempotency_key: str | None = None,
                       metadata: Mapping[str, str] | None = None, timeout_s: float | None = None):
        """Charges once (-> Deduction). Pass the key of the operation you
        bill for, if it has one, so that a retry of yours is a replay too;
        otherwise a new key is made and every retry of this call reuses it.
        Raises InsufficientCredits, AllocationNotFound, KeyReused..."""
        request = deduction_request(
            org_id=org_id, user_id=user_id, amount_millicredits=amount_millicredits,
            service_type=service_type, service_name=service_name,
            idempotency_key=idempotency_key, metadata=metadata)
        key = request.idempotency_key
        return self._invoke("CreditService", "DeductCredits", request, _answer(results.Deduction, key),
                            timeout_s=timeout_s, idempotency_key=key)

    def deduct_credits_batch(self, deductions: Sequence[credit_pb.DeductCreditsRequest | Mapping],
                             *, all_or_nothing: bool = False, timeout_s: float | None = None):
        """Charges many at once (-> BatchDeductions): each item a
        `deduction_request(...)` or a dict of its fields, each with its own
        key (made when missing). A refused item is an error in `items`;
        with all_or_nothing, any refusal raises BatchNotApplied."""
        items = [
            item if isinstance(item, credit_pb.DeductCreditsRequest) and item.idempotency_key
            else deduction_request(**(dict(item) if isinstance(item, Mapping) else _fields(item)))
            for item in deductions
        ]
        keys = [item.idempotency_key for item in items]
        request = credit_pb.DeductCreditsBatchRequest(deductions=items, all_or_nothing=all_or_nothing)
        return self._invoke("CreditService", "DeductCreditsBatch", request, partial(_batch, keys),
                            timeout_s=timeout_s, idempotency_key=None)

    def reserve_credits(self, *, org_id: str, user_id: str, amount_millicredits: int,
                        service_type: str, service_name: str, ttl_s: float | None = None,
                        idempotency_key: str | None = None,
                        metadata: Mapping[str, str] | None = None, timeout_s: float | None = None):
        """Holds an amount until committed, released or expired (->
        Reservation); `reserve` wraps it in a context manager."""
        key = idempotency_key or new_idempotency_key()
        request = credit_pb.ReserveCreditsRequest(
            org_id=org_id, user_id=user_id, amount_millicredits=amount_millicredits,
            ttl=_duration(ttl_s), service_type=service_type, service_name=service_name,
            idempotency_key=key, metadata=metadata or {})
        return self._invoke("CreditService", "ReserveCredits", request, _answer(results.Reservation, key),
                            timeout_s=timeout_s, idempotency_key=key)

    def commit_reservation(self, *, org_id: str, reservation_id: str, amount_millicredits: int,
                           metadata: Mapping[str, str] | None = None,
                           idempotency_key: str | None = None, timeout_s: float | None = None):
        """Charges the actual amount of an open hold and releases the rest (-> Deduction)."""
        key = idempotency_key or new_idempotency_key()
        request = credit_pb.CommitReservationRequest(
            org_id=org_id, reservation_id=reservation_id, amount_millicredits=amount_millicredits,
            metadata=metadata or {}, idempotency_key=key)
        return self._invoke("CreditService", "CommitReservation", request,
                            _answer(results.Deduction, key), timeout_s=timeout_s, idempotency_key=key)

    def release_reservation(self, *, org_id: str, reservation_id: str,
                            idempotency_key: str | None = None, timeout_s: float | None = None):
        """Releases an open hold whole (-> Release)."""
        key = idempotency_key or new_idempotency_key()
        request = credit_pb.ReleaseReservationRequest(
            org_id=org_id, reservation_id=reservation_id, idempotency_key=key)
        return self._invoke("CreditService", "ReleaseReservation", request, _answer(results.Release, key),
                            timeout_s=timeout_s, idempotency_key=key)

    def refund_credits(self, *, org_id: str, deduction_id: str, amount_millicredits: int,
                       reason: str, idempotency_key: str | None = None,
                       timeout_s: float | None = None):
        """Gives all or part of a deduction back (-> Refund)."""
        key = idempotency_key or new_idempotency_key()
        request = credit_pb.RefundCreditsRequest(
            org_id=org_id, deduction_id=deduction_id, amount_millicredits=amount_millicredits,
            reason=reason, idempotency_key=key)
        return self._invoke("CreditService", "RefundCredits", request, _answer(results.Refund, key),
                            timeout_s=timeout_s, idempotency_key=key)


def _fields(message) -> dict:
    return {field.name: value for field, value in message.ListFields()}


def _plain_rpc(service: str, rpc: str):
    """The method of an RPC whose response is returned as it is, in a
    Result: the request's fields as keywords (messages as dicts, enums as
    their names or numbers, timestamps as datetimes)."""
    descriptor = SERVICE_DESCRIPTORS[service].methods_by_name[rpc]
    request_class = getattr(_MODULES[service], descriptor.input_type.name)
    takes_key = "idempotency_key" in descriptor.input_type.fields_by_name

    def call(self, *, timeout_s: float | None = None, **fields):
        key = None
        if takes_key:
            key = fields.get("idempotency_key") or new_idempotency_key()
            fields["idempotency_key"] = key
        request = request_class(**fields)
        return self._invoke(service, rpc, request, partial(_result, key),
                            timeout_s=timeout_s, idempotency_key=key)

    call.__name__ = call.__qualname__ = method_name(rpc)
    call.__doc__ = (f"{service}.{rpc} (protos/orgbilling/v1): the fields of "
                    f"{descriptor.input_type.name} as keywords -> Result[{descriptor.output_type.name}]"
                    + (", a new idempotency key unless given." if takes_key else "."))
    return call


_MODULES = {
    "CreditService": credit_service_pb2,
    "OrgBillingService": org_billing_service_pb2,
    "ReportingService": reporting_service_pb2,
}

# Streams have their own method in each client (export_usage).
STREAMING_RPCS = {"ExportUsage"}

for _service, _descriptor in SERVICE_DESCRIPTORS.items():
    for _method in _descriptor.methods:
        if _method.name not in STREAMING_RPCS and not hasattr(Operations, method_name(_method.name)):
            setattr(Operations, method_name(_method.name), _plain_rpc(_service, _method.name))
