"""Real grpcurl against the server: reflection works with no proto files."""

import json
import subprocess
import sys
from pathlib import Path

GRPCURL = str(Path(sys.executable).parent / "grpcurl")


def grpcurl(address, *args, data=None, token=None):
    command = [GRPCURL, "-plaintext", "-format-error"]
    if token is not None:
        command += ["-H", f"authorization: Bearer {token}"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    result = subprocess.run([*command, address, *args], capture_output=True, text=True, timeout=60)
    return result.returncode, result.stdout + result.stderr


def test_list_describe_and_deduct_with_grpcurl(client, token):
    client.funded_org("acme", 10_000, {"alice": 1_000})
    code, out = grpcurl(client.address, "list")
    assert code == 0, out
    assert {"orgbilling.v1.CreditService", "orgbilling.v1.OrgBillingService", "grpc.health.v1.Health"} <= set(out.split())

    code, out = grpcurl(client.address, "describe", "orgbilling.v1.DeductCreditsRequest")
    assert code == 0 and "int64 amount_millicredits = 3;" in out, out

    request = {"org_id": "acme", "user_id": "alice", "amount_millicredits": "250", "service_type": "llm",
               "service_name": "grpcurl", "idempotency_key": "grpcurl-1"}
    code, out = grpcurl(client.address, "orgbilling.v1.CreditService/DeductCredits", data=request, token=token)
    assert code == 0, out
    assert json.loads(out)["allocation_remaining_millicredits"] == "750"

    request["amount_millicredits"] = "5000"
    request["idempotency_key"] = "grpcurl-2"
    code, out = grpcurl(client.address, "orgbilling.v1.CreditService/DeductCredits", data=request, token=token)
    assert code != 0 and "INSUFFICIENT_CREDITS" in out and '"code": 9' in out, out  # FAILED_PRECONDITION
