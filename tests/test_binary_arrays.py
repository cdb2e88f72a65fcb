"""server.binary_arrays: each typed array reaches PostgreSQL as the
one-dimensional array of its type that psycopg's own list dumper would
have sent, NULLs, empty arrays and the types' edge values included."""

import uuid

import psycopg
import pytest
from psycopg.types.json import Jsonb

from orgbilling.server.binary_arrays import BigintArray, ByteaArray, JsonbArray, TextArray, UuidArray

CASES = [
    (TextArray, "text", ["a", "", "é 漢字 🙂", None, "x" * 10_000]),
    (BigintArray, "bigint", [0, -1, 2**63 - 1, -(2**63), None, 42]),
    (ByteaArray, "bytea", [b"", b"\x00\xff" * 16, None, bytes(range(256))]),
    (UuidArray, "uuid", [uuid.UUID(int=0), None, uuid.uuid4(), uuid.UUID(int=2**128 - 1)]),
    (JsonbArray, "jsonb", [{}, {"model": "m", "tokens": "100"}, None, {"é": "漢字 🙂", "": ""}]),
]


@pytest.fixture
def conn(database_url):
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.mark.parametrize("array, type_name, values", CASES, ids=[c[1] for c in CASES])
def test_a_typed_array_arrives_as_its_type_with_every_value(conn, array, type_name, values):
    row = conn.execute(
        f"SELECT a, pg_typeof(a)::text, array_ndims(a), array_lower(a, 1), a = %b::{type_name}[]"
        f" FROM (SELECT %b::{type_name}[] AS a) AS sent",
        ([Jsonb(v) if isinstance(v, dict) else v for v in values], array(values)),
    ).fetchone()
    assert row == (values, f"{type_name}[]", 1, 1, True)


@pytest.mark.parametrize("array, type_name", [(c[0], c[1]) for c in CASES], ids=[c[1] for c in CASES])
def test_an_empty_typed_array_is_an_empty_array(conn, array, type_name):
    assert conn.execute(f"SELECT %b = '{{}}'::{type_name}[], cardinality(%b)",
                        (array(), array())).fetchone() == (True, 0)


def test_a_typed_array_without_a_cast_is_its_type(conn):
    """The array's own type reaches the server: no cast needed to pick a
    function's argument (deduct_credits_batch takes its arrays so)."""
    assert conn.execute("SELECT pg_typeof(%b)::text, pg_typeof(%b)::text",
                        (BigintArray([1]), JsonbArray([{}]))).fetchone() == ("bigint[]", "jsonb[]")


@pytest.mark.parametrize("array, bad", [
    (BigintArray, 2**63), (BigintArray, -(2**63) - 1), (BigintArray, "1"),
    (TextArray, 1), (TextArray, "\ud800"), (ByteaArray, "text"), (UuidArray, "not a uuid"),
    (JsonbArray, {1: object()}),
])
def test_a_value_its_type_cannot_hold_is_refused_before_anything_is_sent(conn, array, bad):
    with pytest.raises(Exception) as refused:
        conn.execute("SELECT %b", (array(["ok" if array is TextArray else None, bad]),))
    assert not isinstance(refused.value, psycopg.Error), "refused by the server, not before sending"
    assert conn.execute("SELECT 1").fetchone() == (1,)  # the connection is still good
