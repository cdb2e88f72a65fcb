"""The server's CPU to turn a batch of deductions into deduct_credits_batch's
parameters: the nine arrays as plain lists (psycopg's list dumper, which
finds each array's element type from its items) against the typed arrays
of server.binary_arrays, by batch size.

    .venv/bin/python -m benchmarks.micro.array_dump

No database: psycopg's query conversion alone, with orjson for jsonb as on
the server's connections (server.database.use_orjson). Checks first that
both ways give PostgreSQL the same bytes (the amounts apart: psycopg sends
small ints as a narrower integer array, which the function's bigint[]
parameter casts). Best of five rounds; see benchmarks/README.md.
"""

import os
import timeit

import orjson
from psycopg import adapters
from psycopg._queries import PostgresQuery
from psycopg.adapt import Transformer
from psycopg.types.json import Jsonb, set_json_dumps

from orgbilling.server.store import _DEDUCT_BATCH, Deduction, _batch_params

SIZES = (1, 4, 12, 64, 1000)
_AMOUNTS = 2


def deductions(count: int) -> list[Deduction]:
    return [Deduction("org", f"user-{i % 3}", 1000, "llm", "bench", os.urandom(16).hex(),
                      os.urandom(32), os.urandom(16).hex(), {"model": "bench-model", "tokens": "100"})
            for i in range(count)]


def plain_params(items: list[Deduction]) -> list:
    """The arrays as the server built them before server.binary_arrays
    (and all_or_nothing, false)."""
    *columns, metadata = (list(column) for column in zip(*items))
    return [*columns, [Jsonb(entries) for entries in metadata], False]


def dumped(params: list[list]) -> list[bytes]:
    query = PostgresQuery(Transformer(adapters))
    query.convert(_DEDUCT_BATCH, params)
    return query.params


def main() -> None:
    set_json_dumps(orjson.dumps)
    print("deductions  plain lists  typed arrays  (us of CPU a batch; a deduction)")
    for size in SIZES:
        items = deductions(size)
        plain, typed = dumped(plain_params(items)), dumped(_batch_params(items))
        assert [p for i, p in enumerate(plain) if i != _AMOUNTS] == \
            [p for i, p in enumerate(typed) if i != _AMOUNTS], "the typed arrays differ"
        calls = max(10, 20_000 // size)
        times = []
        for build in (plain_params, _batch_params):
            best_s = min(timeit.repeat(lambda: dumped(build(items)), number=calls, repeat=5))
            times.append(best_s / calls * 1e6)
        print(f"{size:>10,}  {times[0]:>8.1f} {times[0] / size:>5.2f}"
              f"  {times[1]:>8.1f} {times[1] / size:>5.2f}")


if __name__ == "__main__":
    main()
