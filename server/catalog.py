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

# Credits included in each billing period (the refresh, granted at each
# period start), in millicredits; a yearly cycle's period is a year, so it
# includes twelve months'. BYOK callers bring their own model keys: none.
# An organization's own refresh (SetCreditRefresh) replaces its plan's.
PLAN_REFRESH_MILLICREDITS: dict[tuple[str, str], int] = {
    ("PLATFORM", "MONTHLY"): 20_000_000,
    ("PLATFORM", "YEARLY"): 240_000_000,
    ("HYBRID", "MONTHLY"): 5_000_000,
    ("HYBRID", "YEARLY"): 60_000_000,
    ("BYOK", "MONTHLY"): 0,
    ("BYOK", "YEARLY"): 0,
}

# 1 credit is worth $0.001 and is 1,000 millicredits, so one cent buys
# 10 credits: 10,000 millicredits.
MILLICREDITS_PER_CENT = 10_000
TRIAL_DAYS_MAX = 365


def plan_price_cents(plan: str, billing_cycle: str) -> int:
    return PLAN_PRICES_CENTS[(plan, billing_cycle)]


def plan_refresh_millicredits(plan: str, billing_cycle: str) -> int:
    return PLAN_REFRESH_MILLICREDITS[(plan, billing_cycle)]


def millicredits_for_cents(amount_paid_cents: int) -> int:
    return amount_paid_cents * MILLICREDITS_PER_CENT
