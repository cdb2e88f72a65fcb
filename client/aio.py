"""AsyncCreditClient: the client over grpc.aio, for asyncio services."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping

import grpc
import grpc.aio

from orgbilling.client.channel import ClientSettings, open_channel, plaintext_metadata
from orgbilling.client.errors import REQUEST_ID_HEADER, OrgBillingError, request_id_in
from orgbilling.client.hold import HoldState
from orgbilling.client.operations import STUBS, Operations, export_request
from orgbilling.client.policy import Attempts
from orgbilling.client.results import Deduction
from orgbilling.v1 import reporting_service_pb2


class AsyncCreditClient(Operations):
    """CreditClient's rules over grpc.aio: every method is awaited.

        async with AsyncCreditClient("billing:50051", token=API_KEY, tls=Tls()) as client:
            await client.deduct_credits(org_id=..., user_id=..., amount_millicredits=1500,
                                        service_type="llm", service_name="chat-api")

    Open it inside the running event loop (an app's lifespan), one per
    process, and close it there."""

    def __init__(self, target: str, **options):
        self.settings = ClientSettings(target=target, **options)
        self._channel = open_channel(self.settings, grpc.aio)
        self._stubs = {name: stub(self._channel) for name, stub in STUBS.items()}
        self._auth_metadata = plaintext_metadata(self.settings)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncCreditClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _invoke(self, service, rpc, request, decode, *, timeout_s, idempotency_key):
        method = getattr(self._stubs[service], rpc)
        attempts = Attempts(self.settings.retry, call_timeout_s=timeout_s or self.settings.timeout_s)
        request_id = uuid.uuid4().hex
        metadata = (*self._auth_metadata, (REQUEST_ID_HEADER, request_id))
        while True:
            call = method(request, timeout=attempts.next_timeout_s(), metadata=metadata)
            try:
                response = await call
            except grpc.RpcError as error:
                failure, delay_s = attempts.after_failure(
                    error, idempotency_key=idempotency_key, request_id=request_id)
                if delay_s is None:
                    raise failure from error
                await asyncio.sleep(delay_s)
            else:
                return decode(response, request_id_in(await call.trailing_metadata()))

    def reserve(self, *, org_id: str, user_id: str, amount_millicredits: int, service_type: str,
                service_name: str, ttl_s: float | None = None,
                metadata: Mapping[str, str] | None = None) -> "AsyncHold":
        """A hold for `async with`: reserved on entry, released on the way
        out unless committed (`await hold.commit(actual)`)."""
        return AsyncHold(self, dict(org_id=org_id, user_id=user_id,
                                    amount_millicredits=amount_millicredits,
                                    service_type=service_type, service_name=service_name,
                                    ttl_s=ttl_s, metadata=metadata))

    async def export_usage(self, *, org_id: str, time_range: Mapping | None = None,
                           chunk_size: int = 0, resume_token: str = "",
                           timeout_s: float = 600.0) -> AsyncIterator[reporting_service_pb2.UsageRecord]:
        """As CreditClient.export_usage: `async for record in ...`."""
        attempts = Attempts(self.settings.retry, call_timeout_s=timeout_s,
                            deadline_within_budget=False)
        request_id = uuid.uuid4().hex
        metadata = (*self._auth_metadata, (REQUEST_ID_HEADER, request_id))
        while True:
            request = export_request(org_id=org_id, time_range=time_range,
                                     chunk_size=chunk_size, resume_token=resume_token)
            try:
                async for chunk in self._stubs["ReportingService"].ExportUsage(
                        request, timeout=attempts.next_timeout_s(), metadata=metadata):
                    for record in chunk.records:
                        yield record
                    resume_token = chunk.resume_token
                    attempts = Attempts(self.settings.retry, call_timeout_s=timeout_s,
                                        deadline_within_budget=False)
                return
            except grpc.RpcError as error:
                failure, delay_s = attempts.after_failure(
                    error, idempotency_key=None, request_id=request_id)
                if delay_s is None:
                    raise failure from error
                await asyncio.sleep(delay_s)


class AsyncHold(HoldState):
    """A reservation in an async with block (AsyncCreditClient.reserve)."""

    async def __aenter__(self) -> "AsyncHold":
        self._reserved(await self._client.reserve_credits(**self._reserve_fields))
        return self

    async def commit(self, amount_millicredits: int, *,
                     metadata: Mapping[str, str] | None = None,
                     timeout_s: float | None = None) -> Deduction:
        fields = self._commit_fields(amount_millicredits, metadata, timeout_s)
        return self._committed(await self._client.commit_reservation(**fields))

    async def __aexit__(self, *exc) -> None:
        if self._should_release():
            try:
                release = await self._client.release_reservation(**self._release_fields())
            except OrgBillingError as error:
                self._release_settled(None, error)
            else:
                self._release_settled(release, None)
