"""`orgbilling serve` whose ledger answers at once: every DeductCredits and
CheckCredits runs its interceptors and its servicer as in the real server,
then gets a fixed answer (OK, sufficient) instead of waiting in a group
commit for the database. Everything else is the real server.

    python -m benchmarks.canned_ledger_server serve    # as `orgbilling serve`

What a deduction or a check costs beyond a no-op before the ledger does
anything (its gRPC message and metadata, authentication, rate limit,
validation, answer): `python -m benchmarks.profile --canned-ledger --scenario
deduct_hot` next to `--scenario noop`. That cost bounds `hot deduct / noop`
and `check / noop` from above, whatever the ledger costs
(benchmarks/README.md).
"""

from orgbilling.server.cli import main
from orgbilling.server.group_commit import GroupCommitter
from orgbilling.server.store import CheckResult, CreditCheck, Deduction, DeductionResult

DEDUCTED = DeductionResult(outcome="OK", deduction_id="019abcde-f012-7345-8678-9abcdef01234",
                           allocation_remaining_millicredits=10**12,
                           pool_spendable_millicredits=10**12, replayed=False)
CHECKED = CheckResult(outcome="OK", sufficient=True, allocation_remaining_millicredits=10**12,
                      pool_spendable_millicredits=10**12)

_submit = GroupCommitter.submit


async def answer_at_once(committer: GroupCommitter, item):
    if isinstance(item, Deduction):
        return DEDUCTED
    if isinstance(item, CreditCheck):
        return CHECKED
    return await _submit(committer, item)


if __name__ == "__main__":
    GroupCommitter.submit = answer_at_once
    main()
