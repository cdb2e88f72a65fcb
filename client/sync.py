"""CreditClient: the client over grpc's blocking API."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping

import grpc

from orgbilling.client.channel import ClientSettings, open_channel, plaintext_metadata
from orgbilling.client.errors import REQUEST_ID_HEADER, OrgBillingError, request_id_in
from orgbilling.client.hold import HoldState
from orgbilling.client.operations import STUBS, Operations, export_request
from orgbilling.client.policy import Attempts
from orgbilling.client.results import Deduction
from orgbilling.v1 import reporting_service_pb2


class CreditClient(Operations):
    """One channel to the service and every RPC on it, each sent with one
    idempotency key and retried (UNAVAILABLE, DEADLINE_EXCEEDED,
    RESOURCE_EXHAUSTED, a lost connection) until the retry policy's budget;
    then the typed error. Never answers yes when it cannot tell.

        client = CreditClient("billing:50051", token=API_KEY, tls=Tls())
        client.deduct_credits(org_id=..., user_id=..., amount_millicredits=1500,
                              service_type="llm", service_name="chat-api")

    The options are ClientSettings' (channel.py). Thread-safe; make one per
    process and close it (or use it as a context manager)."""

    def __init__(self, target: str, **options):
        self.settings = ClientSettings(target=target, **options)
        self._channel = open_channel(self.settings, grpc)
        self._stubs = {name: stub(self._channel) for name, stub in STUBS.items()}
        self._auth_metadata = plaintext_metadata(self.settings)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "CreditClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _invoke(self, service, rpc, request, decode, *, timeout_s, idempotency_key):
        method = getattr(self._stubs[service], rpc)
        attempts = Attempts(self.settings.retry, call_timeout_s=timeout_s or self.settings.timeout_s)
        request_id = uuid.uuid4().hex
        metadata = (*self._auth_metadata, (REQUEST_ID_HEADER, request_id))
        while True:
            try:
                response, call = method.with_call(
                    request, timeout=attempts.next_timeout_s(), metadata=metadata)
            except grpc.RpcError as error:
                failure, delay_s = attempts.after_failure(
                    error, idempotency_key=idempotency_key, request_id=request_id)
                if delay_s is None:
                    raise failure from error
                time.sleep(delay_s)
            else:
                return decode(response, request_id_in(call.trailing_metadata()))

    def reserve(self, *, org_id: str, user_id: str, amount_millicredits: int, service_type: str,
                service_name: str, ttl_s: float | None = None,
                metadata: Mapping[str, str] | None = None) -> "Hold":
        """A hold for `with`: reserved on entry, released on the way out
        unless committed.

            with client.reserve(org_id=..., user_id=..., amount_millicredits=5000,
                                service_type="llm", service_name="chat-api") as hold:
                actual = run_the_model()
                hold.commit(actual)
        """
        return Hold(self, dict(org_id=org_id, user_id=user_id,
                               amount_millicredits=amount_millicredits, service_type=service_type,
                               service_name=service_name, ttl_s=ttl_s, metadata=metadata))

    def export_usage(self, *, org_id: str, time_range: Mapping | None = None,
                     chunk_size: int = 0, resume_token: str = "",
                     timeout_s: float = 600.0) -> Iterator[reporting_service_pb2.UsageRecord]:
        """Every usage record of the org in the range, oldest first. A stream
        cut by a retryable failure resumes after the last chunk received, so
        no record is skipped or repeated."""
        attempts = Attempts(self.settings.retry, call_timeout_s=timeout_s,
                            deadline_within_budget=False)
        request_id = uuid.uuid4().hex
        metadata = (*self._auth_metadata, (REQUEST_ID_HEADER, request_id))
        while True:
            request = export_request(org_id=org_id, time_range=time_range,
                                     chunk_size=chunk_size, resume_token=resume_token)
            try:
                for chunk in self._stubs["ReportingService"].ExportUsage(
                        request, timeout=attempts.next_timeout_s(), metadata=metadata):
                    yield from chunk.records
                    resume_token = chunk.resume_token
                    attempts = Attempts(self.settings.retry, call_timeout_s=timeout_s,
                                        deadline_within_budget=False)
                return
            except grpc.RpcError as error:
                failure, delay_s = attempts.after_failure(
                    error, idempotency_key=None, request_id=request_id)
                if delay_s is None:
                    raise failure from error
                time.sleep(delay_s)


class Hold(HoldState):
    """A reservation in a with block (CreditClient.reserve)."""

    def __enter__(self) -> "Hold":
        self._reserved(self._client.reserve_credits(**self._reserve_fields))
        return self

    def commit(self, amount_millicredits: int, *, metadata: Mapping[str, str] | None = None,
               timeout_s: float | None = None) -> Deduction:
        """Charges the actual amount (at most the amount held, or as the
        server allows) and releases the rest."""
        fields = self._commit_fields(amount_millicredits, metadata, timeout_s)
        return self._committed(self._client.commit_reservation(**fields))

    def __exit__(self, *exc) -> None:
        if self._should_release():
            try:
                release = self._client.release_reservation(**self._release_fields())
            except OrgBillingError as error:
                self._release_settled(None, error)
            else:
                self._release_settled(release, None)
