"""The one table of what each RPC requires.

Every RPC of every orgbilling service must appear in METHOD_SCOPES; a test
walks the generated descriptors and fails when one is missing, and the auth
interceptor refuses an RPC it finds no scope for (fail closed).
"""

CREDITS_READ = "credits.read"
CREDITS_DEDUCT = "credits.deduct"
CREDITS_MANAGE = "credits.manage"
# Minting credits is a power of its own, apart from managing allocations.
CREDITS_GRANT = "credits.grant"
BILLING_ADMIN = "billing.admin"
# Recording what the external billing system reports (invoices, payments).
BILLING_WRITE = "billing.write"

ALL_SCOPES = frozenset({
    CREDITS_READ, CREDITS_DEDUCT, CREDITS_MANAGE, CREDITS_GRANT, BILLING_ADMIN, BILLING_WRITE,
})

# Calls needing these scopes change nothing; they spend the caller's read
# budget of the rate limiter, every other call its write budget.
READ_SCOPES = frozenset({CREDITS_READ, BILLING_ADMIN})

# gRPC method path -> the scope a caller needs to call it.
METHOD_SCOPES: dict[str, str] = {
    "/orgbilling.v1.CreditService/CheckCredits": CREDITS_READ,
    "/orgbilling.v1.CreditService/DeductCredits": CREDITS_DEDUCT,
    "/orgbilling.v1.CreditService/DeductCreditsBatch": CREDITS_DEDUCT,
    "/orgbilling.v1.CreditService/ReserveCredits": CREDITS_DEDUCT,
    "/orgbilling.v1.CreditService/CommitReservation": CREDITS_DEDUCT,
    "/orgbilling.v1.CreditService/ReleaseReservation": CREDITS_DEDUCT,
    "/orgbilling.v1.CreditService/GetReservation": CREDITS_READ,
    "/orgbilling.v1.CreditService/ListReservations": CREDITS_READ,
    # Giving credits back is an operator's decision, not a metered caller's.
    "/orgbilling.v1.CreditService/RefundCredits": CREDITS_MANAGE,
    "/orgbilling.v1.OrgBillingService/CreateSubscription": CREDITS_MANAGE,
    "/orgbilling.v1.OrgBillingService/GetSubscription": CREDITS_READ,
    "/orgbilling.v1.OrgBillingService/ChangePlan": CREDITS_MANAGE,
    "/orgbilling.v1.OrgBillingService/CancelSubscription": CREDITS_MANAGE,
    "/orgbilling.v1.OrgBillingService/GetCreditPool": CREDITS_READ,
    "/orgbilling.v1.OrgBillingService/AddCredits": CREDITS_GRANT,
    # Overage is credit the org may spend before paying for it: a grant.
    "/orgbilling.v1.OrgBillingService/SetOverage": CREDITS_GRANT,
    "/orgbilling.v1.OrgBillingService/SetCreditRefresh": CREDITS_GRANT,
    "/orgbilling.v1.OrgBillingService/AllocateCredits": CREDITS_MANAGE,
    "/orgbilling.v1.OrgBillingService/RevokeAllocation": CREDITS_MANAGE,
    "/orgbilling.v1.OrgBillingService/ListAllocations": CREDITS_READ,
    "/orgbilling.v1.OrgBillingService/RecordInvoice": BILLING_WRITE,
    "/orgbilling.v1.ReportingService/GetUsageSummary": CREDITS_READ,
    "/orgbilling.v1.ReportingService/GetOrgBilling": CREDITS_READ,
    "/orgbilling.v1.ReportingService/ListAllocationUsage": CREDITS_READ,
    "/orgbilling.v1.ReportingService/GetUserBilling": CREDITS_READ,
    "/orgbilling.v1.ReportingService/GetSystemBilling": BILLING_ADMIN,
    "/orgbilling.v1.ReportingService/ListOrgSummaries": BILLING_ADMIN,
    "/orgbilling.v1.ReportingService/GetOrgBillingMetrics": CREDITS_READ,
    "/orgbilling.v1.ReportingService/ListUsage": CREDITS_READ,
    "/orgbilling.v1.ReportingService/ListBillingHistory": CREDITS_READ,
    "/orgbilling.v1.ReportingService/ExportUsage": CREDITS_READ,
}

# Calls that name no organization but span several, for a caller limited to
# some organizations: the servicer shows such a caller only those (the auth
# interceptor lets them through instead of refusing a request with no org_id).
FILTERED_BY_CALLER_ORGS = frozenset({
    "/orgbilling.v1.ReportingService/GetUserBilling",
})

# Infrastructure services: open to anyone by default (setting
# unauthenticated_services); when closed, any authenticated caller may use
# them, with no scope.
INFRASTRUCTURE_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)


def service_of(method: str) -> str:
    """'orgbilling.v1.CreditService' from '/orgbilling.v1.CreditService/CheckCredits'."""
    return method.lstrip("/").split("/", 1)[0]


def required_scope(method: str) -> str | None:
    """The scope `method` needs: "" for an infrastructure service (any
    authenticated caller), None when nothing is declared (refuse)."""
    if service_of(method) in INFRASTRUCTURE_SERVICES:
        return ""
    return METHOD_SCOPES.get(method)


def is_read(method: str) -> bool:
    """Whether the call spends the read budget (it changes nothing)."""
    scope = required_scope(method)
    return scope == "" or scope in READ_SCOPES


def parse_scopes(text: str) -> frozenset[str]:
    """Scopes from 'a,b' or 'a b'; raises ValueError on an unknown one."""
    scopes = frozenset(part for part in text.replace(",", " ").split() if part)
    unknown = scopes - ALL_SCOPES
    if unknown:
        raise ValueError(
            f"unknown scope(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(ALL_SCOPES))}"
        )
    return scopes
