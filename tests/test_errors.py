"""Failures the caller cannot fix are mapped as the design says: a bug is
INTERNAL with a generic message, a database failure is UNAVAILABLE (fail
closed), a full connection queue is RESOURCE_EXHAUSTED. Never UNKNOWN."""

import grpc
import psycopg
import psycopg_pool
import pytest

from orgbilling.v1 import credit_service_pb2 as pb
from tests.support import raises_rpc


def check(client):
    return client.credits.CheckCredits(pb.CheckCreditsRequest(org_id="acme", user_id="a", amount_millicredits=1))


@pytest.mark.parametrize("failure, code, reason", [
    (RuntimeError("secret detail: password=hunter2"), grpc.StatusCode.INTERNAL, "INTERNAL"),
    (psycopg.OperationalError("connection lost"), grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE"),
    (psycopg_pool.PoolTimeout("no connection"), grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE"),
    (psycopg.errors.QueryCanceled("statement timeout"), grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE"),
    (psycopg_pool.TooManyRequests("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_BUSY"),
])
def test_failures_map_to_the_documented_status(client, server, monkeypatch, failure, code, reason):
    async def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(server.check_coalescer, "_commit_batch", fail)
    with raises_rpc(code, reason) as refused:
        check(client)
    assert "hunter2" not in refused["error"].details()
    assert "password" not in str(refused["info"])
