"""The README's client examples, run as written against a real server: the
few lines of the blocking client, and the FastAPI service that charges per
request (only the channel differs: plaintext here, TLS in the README)."""

import re

import pytest
from fastapi.testclient import TestClient

from orgbilling.client import CreditClient, RetryPolicy
from tests.server_process import free_port
from tests.support import REPO, fund_org

README = (REPO / "README.md").read_text()


def python_block_after(heading: str) -> str:
    section = README[README.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def plaintext(code: str) -> str:
    assert "tls=Tls()" in code
    return code.replace("tls=Tls()", "insecure=True")


@pytest.fixture
def billing(server, token):
    with CreditClient(f"127.0.0.1:{server.port}", token=token, insecure=True) as client:
        fund_org(client, "acme", 100_000, {"alice": 60_000})
        yield client


def used(billing) -> int:
    return billing.get_credit_pool(org_id="acme").response.pool.used_millicredits


def test_the_few_lines_of_the_client_run_as_written(server, token, billing, capsys):
    code = plaintext(python_block_after("## Calling it from Python")).replace(
        '"billing.internal:50051"', f'"127.0.0.1:{server.port}"')
    exec(compile(code, "README.md", "exec"), {"API_KEY": token, "run_the_model": lambda: 7_000})
    assert used(billing) == 2_500 + 7_000
    assert capsys.readouterr().out.split()[1:3] == ["False", "57500"]


def test_the_fastapi_service_charges_each_request_once(server, token, billing, monkeypatch):
    monkeypatch.setenv("BILLING_TARGET", f"127.0.0.1:{server.port}")
    monkeypatch.setenv("BILLING_TOKEN", token)
    service = {}
    exec(compile(plaintext(python_block_after("### Charging per request")), "README.md", "exec"),
         service)
    alice = {"x-org-id": "acme", "x-user-id": "alice"}
    with TestClient(service["app"]) as http:
        assert http.get("/search", params={"q": "a"}, headers=alice).status_code == 200
        retried = {**alice, "idempotency-key": "http-request-7"}
        for _ in range(3):
            answer = http.get("/search", params={"q": "b"}, headers=retried)
            assert answer.json() == {"query": "b", "results": []}
        assert used(billing) == 2_000
        billing.deduct_credits(org_id="acme", user_id="alice", amount_millicredits=57_500,
                               service_type="llm", service_name="t")
        refused = http.get("/search", params={"q": "c"}, headers=alice)
        assert refused.status_code == 402 and "500 millicredits left" in refused.text
    assert used(billing) == 59_500


def test_the_fastapi_service_fails_closed_when_billing_cannot_answer(monkeypatch, token):
    """Nothing listens where billing should be: 503, never a free answer."""
    monkeypatch.setenv("BILLING_TARGET", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("BILLING_TOKEN", token)
    code = plaintext(python_block_after("### Charging per request")).replace(
        "insecure=True", "insecure=True, retry=RetryPolicy(budget_s=0.5)")
    service = {"RetryPolicy": RetryPolicy}
    exec(compile(code, "README.md", "exec"), service)
    with TestClient(service["app"]) as http:
        answer = http.get("/search", params={"q": "a"}, headers={"x-org-id": "acme", "x-user-id": "alice"})
    assert answer.status_code == 503
