"""The plan catalog and the credit rate: prices are the server's, never the caller's."""

# Price per billing cycle, in cents.
PLAN_PRICES_CENTS: dict[tuple[str, str], int] = {
    ("PLATFORM", "MONTHLY"): 4_900,
    ("PLATFORM", "YEARLY"): 49_000,
    ("HYBRID", "MONTHLY"): 2_900,
    ("HYBRID", "YEARLY"): 29_000,
    ("BYOK", "MONTHLY"): 1_900,
    ("BYOK", "YEARLY"): 19_000,
}
CATALOG_CURRENCY = "USD"

# 1 credit is worth $0.001 and is 1,000 millicredits, so one cent buys
# 10 credits: 10,000 millicredits.
MILLICREDITS_PER_CENT = 10_000
TRIAL_DAYS_MAX = 365


def plan_price_cents(plan: str, billing_cycle: str) -> int:
    return PLAN_PRICES_CENTS[(plan, billing_cycle)]


def millicredits_for_cents(amount_paid_cents: int) -> int:
    return amount_paid_cents * MILLICREDITS_PER_CENT
