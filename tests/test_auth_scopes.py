"""The scope table covers every RPC, and org restrictions see every org_id a
request names. No server needed: these read the generated descriptors."""

import importlib
import pkgutil
import re

import orgbilling.v1
from orgbilling.v1 import credit_service_pb2 as pb
from orgbilling.server.auth.orgs import org_ids_in
from orgbilling.server.auth.scopes import ALL_SCOPES, METHOD_SCOPES, is_read, required_scope
from tests.support import readme_table


def every_rpc_in_the_generated_code() -> set[str]:
    """'/package.Service/Method' of every RPC of every generated service, so a
    new RPC or service is covered without editing this test."""
    methods = set()
    for module_info in pkgutil.iter_modules(orgbilling.v1.__path__):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"orgbilling.v1.{module_info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                methods.add(f"/{service.full_name}/{method.name}")
    return methods


def test_every_rpc_of_every_service_declares_a_known_scope():
    """Fails when someone adds an RPC without saying which scope it needs."""
    rpcs = every_rpc_in_the_generated_code()
    assert len(rpcs) >= 12
    missing = sorted(rpc for rpc in rpcs if rpc not in METHOD_SCOPES)
    assert not missing, f"add these to METHOD_SCOPES in server/auth/scopes.py: {missing}"
    assert set(METHOD_SCOPES.values()) <= ALL_SCOPES


def test_the_readme_table_of_scopes_is_the_servers():
    """The README's table says what METHOD_SCOPES says, RPC for RPC (it
    once fell behind by a dozen RPCs)."""
    in_readme = {rpc: scope.strip("`") for scope, rpcs in readme_table("| scope | RPCs |")
                 for rpc in re.split(r",\s*", rpcs.split(":")[0])}
    assert in_readme == {path.rsplit("/", 1)[1]: scope for path, scope in METHOD_SCOPES.items()}


def test_the_readme_table_of_the_api_names_every_rpc():
    """The README's table of services and RPCs, against the generated code."""
    in_readme, service = set(), None
    for row_service, rpcs, _ in readme_table("| service | RPC | what it does |"):
        service = row_service or service
        in_readme |= {f"/orgbilling.v1.{service}/{rpc}" for rpc in rpcs.split(" / ")}
    assert in_readme == every_rpc_in_the_generated_code()


def test_the_scope_table_names_only_rpcs_that_exist():
    """A typo in the table would leave the real RPC without a scope."""
    assert set(METHOD_SCOPES) - every_rpc_in_the_generated_code() == set()


def test_scopes_follow_the_issue():
    assert required_scope("/orgbilling.v1.CreditService/CheckCredits") == "credits.read"
    assert required_scope("/orgbilling.v1.CreditService/DeductCredits") == "credits.deduct"
    assert required_scope("/orgbilling.v1.CreditService/DeductCreditsBatch") == "credits.deduct"
    assert required_scope("/orgbilling.v1.OrgBillingService/AddCredits") == "credits.grant"
    # Overage is credit spent before it is paid for: granted like credits.
    assert required_scope("/orgbilling.v1.OrgBillingService/SetOverage") == "credits.grant"
    assert required_scope("/orgbilling.v1.OrgBillingService/AllocateCredits") == "credits.manage"
    assert required_scope("/orgbilling.v1.OrgBillingService/ListAllocations") == "credits.read"
    assert required_scope("/grpc.health.v1.Health/Check") == ""
    assert required_scope("/orgbilling.v1.CreditService/NoSuchMethod") is None
    assert is_read("/orgbilling.v1.OrgBillingService/GetCreditPool")
    assert not is_read("/orgbilling.v1.CreditService/DeductCredits")


def test_refunds_need_credits_manage_and_are_writes():
    """Giving credits back is an operator's decision: a metered caller with
    credits.deduct may not refund what it charged."""
    method = "/orgbilling.v1.CreditService/RefundCredits"
    assert method in every_rpc_in_the_generated_code()
    assert required_scope(method) == "credits.manage"
    assert not is_read(method)


def test_org_ids_are_found_at_any_depth():
    """A batch names one org per deduction; a restricted credential must be
    allowed on all of them."""
    batch = pb.DeductCreditsBatchRequest(deductions=[
        pb.DeductCreditsRequest(org_id="acme"), pb.DeductCreditsRequest(org_id="globex"),
        pb.DeductCreditsRequest(),
    ])
    assert org_ids_in(batch) == {"acme", "globex"}
    assert org_ids_in(pb.CheckCreditsRequest(org_id="acme")) == {"acme"}
    assert org_ids_in(pb.CheckCreditsRequest()) == set()


REPORTS = ("GetUsageSummary", "GetOrgBilling", "ListAllocationUsage", "GetUserBilling", "GetSystemBilling",
           "ListOrgSummaries", "GetOrgBillingMetrics", "ListUsage", "ListBillingHistory", "ExportUsage")


def test_reporting_and_invoice_rpcs_need_the_documented_scopes():
    """docs/reporting.md, "Who sees what": reports need credits.read, the
    platform-wide ones billing.admin, RecordInvoice billing.write; all ten
    reports are in the generated code and the table, and every report is a
    read (the read budget of the rate limiter)."""
    generated = every_rpc_in_the_generated_code()
    for name in REPORTS:
        method = f"/orgbilling.v1.ReportingService/{name}"
        assert method in generated
        expected = "billing.admin" if name in ("GetSystemBilling", "ListOrgSummaries") else "credits.read"
        assert required_scope(method) == expected, method
        assert is_read(method), method
    assert {m for m in generated if m.startswith("/orgbilling.v1.ReportingService/")} == {
        f"/orgbilling.v1.ReportingService/{name}" for name in REPORTS}
    assert required_scope("/orgbilling.v1.OrgBillingService/RecordInvoice") == "billing.write"
    assert not is_read("/orgbilling.v1.OrgBillingService/RecordInvoice")


def test_only_get_user_billing_is_filtered_by_the_callers_orgs():
    """The one report that names no org yet serves org-limited callers (it
    shows them only their orgs); the platform-wide reports are not in the
    list, so the auth interceptor refuses them to such callers."""
    from orgbilling.server.auth.scopes import FILTERED_BY_CALLER_ORGS

    assert FILTERED_BY_CALLER_ORGS == {"/orgbilling.v1.ReportingService/GetUserBilling"}
