"""The server's own CPU per item of a DeductCreditsBatch of 1,000, gRPC
aside: the servicer's validation and fingerprints, psycopg's dumping of the
arrays and loading of the rows, the answer's messages; and PostgreSQL's CPU
per item next to it.

    .venv/bin/python -m benchmarks.micro.batch_server_cost

Calls CreditServicer.DeductCreditsBatch directly, on a Store over the
server's own pool (server.database.open_pool, so its connection settings),
one hot allocation. This process's CPU is time.process_time(); the
backend's is read from /proc/<pid>/stat. Run it from a worktree of an older
commit to measure that commit's code. Five rounds; the first warms plans
and caches. See benchmarks/README.md.
"""

import os
import time

from benchmarks.micro.ledger import backend_cpu_s, credit_servicer, hot_allocation_database
from orgbilling.v1 import credit_service_pb2 as pb
from orgbilling.server.database import open_pool
from orgbilling.server.settings import Settings
from orgbilling.server.store import Store
from tests.postgres import Postgres

ITEMS, BATCHES = 1000, 8


def request() -> pb.DeductCreditsBatchRequest:
    return pb.DeductCreditsBatchRequest(deductions=[
        pb.DeductCreditsRequest(
            org_id="o", user_id="u", amount_millicredits=1, service_type="llm",
            service_name="bench", idempotency_key=os.urandom(16).hex(),
            metadata={"model": "bench-model", "tokens": "100"})
        for _ in range(ITEMS)])


def main() -> None:
    postgres = Postgres()
    try:
        url = hot_allocation_database(postgres, "batch_server_cost")
        settings = Settings(database_url=url, pool_size_min=1, pool_size_max=1,
                            deduct_batch_items_max=ITEMS)
        pool = open_pool(settings, url)
        pool.wait()
        store = Store(pool, pool_wait_timeout_ms=settings.pool_wait_timeout_ms,
                      statement_timeout_ms=settings.statement_timeout_ms)
        servicer = credit_servicer(settings, store)
        with pool.connection() as conn:
            backend = conn.info.backend_pid
        for _ in range(5):
            requests = [request() for _ in range(BATCHES)]
            with pool.connection() as conn:
                assert conn.info.backend_pid == backend
                cpu_before = backend_cpu_s(conn)
            own_before = time.process_time()
            for batch in requests:
                answer = servicer.DeductCreditsBatch(batch, None)
                assert all(result.HasField("deduction") for result in answer.results)
            own = time.process_time() - own_before
            time.sleep(0.05)  # /proc's CPU time catches up
            with pool.connection() as conn:
                db = backend_cpu_s(conn) - cpu_before
            count = ITEMS * BATCHES
            print(f"server {own / count * 1e6:.1f} us/item, db {db / count * 1e6:.1f} us/item",
                  flush=True)
        pool.close()
    finally:
        postgres.close()


if __name__ == "__main__":
    main()
