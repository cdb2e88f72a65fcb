"""server.binary_arrays: each typed array reaches PostgreSQL as the
one-dimensional array of its type that psycopg's own list dumper would
have sent, NULLs, empty arrays, the types' edge values and a client_encoding
other than UTF8 included; a value its type cannot hold is refused."""

import uuid

import psycopg
import pytest
from psycopg.types.json import Jsonb

from orgbilling.server.binary_arrays import BigintArray, ByteaArray, JsonbArray, TextArray, UuidArray
from orgbilling.server.database import connection_options
from orgbilling.server.settings import Settings

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


@pytest.mark.parametrize("bad", [3, [104, 105], "hi"], ids=["an int", "a list of ints", "a str"])
def test_a_bytea_item_must_be_a_buffer(conn, bad):
    """bytes(3) would be three zero bytes, bytes([104, 105]) b"hi": a wrong
    request hash, sent without a word. Only a buffer is a bytea."""
    with pytest.raises(TypeError):
        conn.execute("SELECT %b", (ByteaArray([bad]),))
    assert conn.execute("SELECT %b", (ByteaArray([bytearray(b"ab"), memoryview(b"cd")]),)
                        ).fetchone() == ([b"ab", b"cd"],)


def test_text_follows_the_connections_client_encoding(database_url):
    """PostgreSQL reads text, and jsonb's, in the client_encoding; a LATIN1
    connection gets LATIN1 bytes, as psycopg's own str dumper sends it."""
    with psycopg.connect(database_url, autocommit=True, client_encoding="LATIN1") as conn:
        assert conn.execute(
            """SELECT %b = ARRAY['é', NULL]::text[], %b = ARRAY['{"é": "à"}']::jsonb[], %b::text""",
            (TextArray(["é", None]), JsonbArray([{"é": "à"}]), TextArray(["é"])),
        ).fetchone() == (True, True, "{é}")


def test_the_service_speaks_utf8_whatever_the_environment_says(database_url, monkeypatch):
    monkeypatch.setenv("PGCLIENTENCODING", "LATIN1")
    with psycopg.connect(database_url, **connection_options(Settings())) as conn:
        assert conn.execute("SHOW client_encoding").fetchone() == ("UTF8",)


def test_psycopg_still_dumps_other_arrays_by_type(conn):
    """Only the typed lists use these dumpers: psycopg's own remain those of
    the array types, for a COPY told the types of nested lists."""
    conn.execute("CREATE TEMPORARY TABLE t (a bigint[], b text[])")
    with conn.cursor().copy("COPY t FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(["int8[]", "text[]"])
        copy.write_row([[[1, 2], [3, 4]], [["a"], ["b"]]])
    assert conn.execute("SELECT a, b FROM t").fetchone() == ([[1, 2], [3, 4]], [["a"], ["b"]])
