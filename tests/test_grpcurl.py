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
    assert {"orgbilling.v1.CreditService", "orgbilling.v1.OrgBillingService",
            "orgbilling.v1.ReportingService", "grpc.health.v1.Health"} <= set(out.split())

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


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_examples(section: str) -> list[tuple[str, dict]]:
    """(method, request) of every grpcurl call in one section of the README."""
    import re

    text = README.read_text()
    start = text.index(f"\n### {section}\n")
    body = text[start:text.index("\n### ", start + 1)]
    calls = re.findall(r"-d '(\{.*?\})' \\\n\s+127\.0\.0\.1:50051 (\S+)", body)
    return [(method, json.loads(data)) for data, method in calls]


def test_the_readmes_reporting_examples_run(client, token):
    """Every grpcurl example of the README's Reporting section, as written,
    answers OK: one per ReportingService RPC, and RecordInvoice."""
    client.funded_org("acme", 10_000, {"alice": 1_000})
    examples = readme_examples("Reporting")
    methods = {method for method, _ in examples}
    assert {f"orgbilling.v1.ReportingService/{name}" for name in (
        "GetUsageSummary", "GetOrgBilling", "ListAllocationUsage", "GetUserBilling",
        "GetSystemBilling", "ListOrgSummaries", "GetOrgBillingMetrics", "ListUsage",
        "ListBillingHistory", "ExportUsage")} | {"orgbilling.v1.OrgBillingService/RecordInvoice"} <= methods
    for method, request in examples:
        code, out = grpcurl(client.address, method, data=request, token=token)
        assert code == 0, (method, out)


def test_the_readmes_reservation_examples_run(client, token):
    """The README's Reservations section as written: the hold, its commit
    (with the id the hold returned), the release refused since the hold is
    committed, and the reads."""
    client.funded_org("acme", 10_000_000, {"alice": 1_000_000})
    examples = readme_examples("Reservations")
    assert [method.rsplit("/", 1)[1] for method, _ in examples] == [
        "ReserveCredits", "CommitReservation", "ReleaseReservation", "GetReservation", "ListReservations"]
    (reserve_method, reserve_request), *rest = examples
    code, out = grpcurl(client.address, reserve_method, data=reserve_request, token=token)
    assert code == 0, out
    reservation_id = json.loads(out)["reservation_id"]
    for method, request in rest:
        request = {key: reservation_id if value == "'$RESERVATION_ID'" else value
                   for key, value in request.items()}
        code, out = grpcurl(client.address, method, data=request, token=token)
        if method.endswith("/ReleaseReservation"):
            assert code != 0 and "RESERVATION_NOT_OPEN" in out and "COMMITTED" in out, out
        else:
            assert code == 0, (method, out)
    assert "RESERVATION_STATE_COMMITTED" in grpcurl(
        client.address, "orgbilling.v1.CreditService/GetReservation",
        data={"org_id": "acme", "reservation_id": reservation_id}, token=token)[1]


def test_the_readmes_refund_examples_run(client, token):
    """The README's Refunds section as written: the deduction, its partial
    refund (with the id the deduction returned), and the REFUND event."""
    client.funded_org("acme", 10_000_000, {"alice": 1_000_000})
    examples = readme_examples("Refunds")
    assert [method.rsplit("/", 1)[1] for method, _ in examples] == [
        "DeductCredits", "RefundCredits", "ListBillingHistory"]
    (deduct_method, deduct_request), *rest = examples
    code, out = grpcurl(client.address, deduct_method, data=deduct_request, token=token)
    assert code == 0, out
    deduction_id = json.loads(out)["deduction_id"]
    outs = []
    for method, request in rest:
        request = {key: deduction_id if value == "'$DEDUCTION_ID'" else value
                   for key, value in request.items()}
        code, out = grpcurl(client.address, method, data=request, token=token)
        assert code == 0, (method, out)
        outs.append(out)
    assert "refund_id" in outs[0]
    assert deduction_id in outs[1] and "BILLING_EVENT_TYPE_REFUND" in outs[1]


def test_the_readmes_overage_examples_run(client, token):
    """The README's Overage section as written: set, the OVERAGE_CHANGED
    events, and removal."""
    client.funded_org("acme", 10_000_000, {"alice": 1_000_000})
    examples = readme_examples("Overage")
    assert [method.rsplit("/", 1)[1] for method, _ in examples] == [
        "SetOverage", "ListBillingHistory", "SetOverage"]
    outs = []
    for method, request in examples:
        code, out = grpcurl(client.address, method, data=request, token=token)
        assert code == 0, (method, out)
        outs.append(out)
    assert '"overage_limit_millicredits": "50000"' in outs[0]
    assert "BILLING_EVENT_TYPE_OVERAGE_CHANGED" in outs[1]


def test_the_readmes_refresh_examples_run(client, token):
    """The README's Refresh section as written: set the org's own refresh
    and rollover, back to the plan's, and the credit events."""
    client.funded_org("acme", 10_000_000, {"alice": 1_000_000})
    examples = readme_examples("Refresh and billing periods")
    assert [method.rsplit("/", 1)[1] for method, _ in examples] == [
        "SetCreditRefresh", "SetCreditRefresh", "ListBillingHistory"]
    outs = []
    for method, request in examples:
        code, out = grpcurl(client.address, method, data=request, token=token)
        assert code == 0, (method, out)
        outs.append(out)
    assert '"refresh_overridden": true' in outs[0] and '"rollover_cap_millicredits": "10000000"' in outs[0]
    assert "refresh_overridden" not in outs[1]
    assert "BILLING_EVENT_TYPE_CREDITS_ADDED" in outs[2]
