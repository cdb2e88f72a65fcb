"""Converting costs to millicredits, for services that price in dollars."""

from decimal import ROUND_CEILING, Decimal

from orgbilling.server.catalog import MILLICREDITS_PER_DOLLAR


def millicredits_for_dollars(cost_dollars: Decimal | str) -> int:
    """Rounds up to the next millicredit: nothing is free by truncation.

    Takes a Decimal or its string, never a float: 0.1 has no exact float.
    """
    if isinstance(cost_dollars, float):
        raise TypeError("pass a Decimal or a string, not a float")
    cost = Decimal(cost_dollars)
    if cost < 0:
        raise ValueError("a cost cannot be negative")
    return int((cost * MILLICREDITS_PER_DOLLAR).to_integral_value(rounding=ROUND_CEILING))
