"""The batches' array parameters, each a list of one known element type that
dumps itself into PostgreSQL's binary array format in one pass.

psycopg dumps a plain list by finding an element type from its items (ints
all scanned, for the narrowest type), a dumper for that type, then item by
item through it. For a group-committed batch of 12 deductions that came to
55-57 us of the server's CPU for the nine arrays; typed, 26 us; for a
DeductCreditsBatch of 1,000, 1.83 against 1.22 ms
(benchmarks/micro/array_dump.py, both ways in one process).

The dumpers are registered once, globally (psycopg.adapters), so that a
typed array means the same on every connection made after this module is
imported; one made before would still dump it as the list it also is.
"""

import struct
from collections.abc import Callable
from operator import attrgetter

import orjson
import psycopg
from psycopg import postgres, pq
from psycopg.adapt import Dumper


class TextArray(list):
    """text[]: str items, or None."""


class BigintArray(list):
    """bigint[]: int items, or None."""


class ByteaArray(list):
    """bytea[]: bytes items, or None."""


class UuidArray(list):
    """uuid[]: uuid.UUID items, or None."""


class JsonbArray(list):
    """jsonb[]: items orjson can dump (dicts of text here), or None."""


# array_send's layout: dimensions, whether any item is NULL, the items'
# type; then, for the one dimension, its length and lower bound; then each
# item as its length in bytes (-1: NULL) and its binary form.
_HEADER = struct.Struct("!iiIii")
_EMPTY = struct.Struct("!iiI")
_LENGTH = struct.Struct("!i").pack
_NULL = _LENGTH(-1)
_BIGINT = struct.Struct("!q").pack
_JSONB_VERSION = b"\x01"


def _dumper(type_name: str, encode: Callable | None = None, *,
            encode_in: Callable[[str], Callable] | None = None) -> type[Dumper]:
    """The dumper of one array type, whose items' binary form is encode(item),
    or, for the types PostgreSQL reads in the client encoding (text, jsonb),
    encode_in(the connection's Python encoding name)(item)."""
    element_oid = postgres.types[type_name].oid
    array_oid = postgres.types[type_name].array_oid

    class ArrayDumper(Dumper):
        format = pq.Format.BINARY
        # The array's oid is set on each dumper, not on the class: psycopg
        # registers a class with an oid as the dumper of that oid too, for
        # whoever knows only the type (COPY's set_types), and this one dumps
        # flat lists of one type only.
        oid = 0

        def __init__(self, cls: type, context=None):
            super().__init__(cls, context)
            self.oid = array_oid
            if encode_in is None:
                self._encode = encode
            else:
                self._encode = encode_in(self.connection.info.encoding if self.connection else "utf-8")

        def dump(self, obj: list) -> bytes:
            if not obj:
                return _EMPTY.pack(0, 0, element_oid)
            encode = self._encode
            parts = [b""]
            has_null = 0
            for item in obj:
                if item is None:
                    parts.append(_NULL)
                    has_null = 1
                else:
                    data = encode(item)
                    parts += (_LENGTH(len(data)), data)
            parts[0] = _HEADER.pack(1, has_null, element_oid, len(obj), 1)
            return b"".join(parts)

    ArrayDumper.__name__ = ArrayDumper.__qualname__ = f"{type_name.capitalize()}ArrayDumper"
    return ArrayDumper


# PostgreSQL reads text, and jsonb's text, in the connection's
# client_encoding (server.database asks for UTF8 on every connection; any
# other is honoured here as psycopg's own str dumper does).
def _text(encoding: str) -> Callable[[str], bytes]:
    if encoding == "utf-8":
        return str.encode
    return lambda value: value.encode(encoding)


def _jsonb(encoding: str) -> Callable[[object], bytes]:
    if encoding == "utf-8":
        return lambda value: _JSONB_VERSION + orjson.dumps(value)
    return lambda value: _JSONB_VERSION + orjson.dumps(value).decode().encode(encoding)


def _bytea(value) -> bytes:
    # Not bytes(value) for any value: that makes an int n into n zero bytes,
    # and a list of ints into their bytes; only a buffer is a bytea's value.
    return value if type(value) is bytes else bytes(memoryview(value))


for _array, _type_name, _encoder in (
    (TextArray, "text", {"encode_in": _text}),
    (BigintArray, "int8", {"encode": _BIGINT}),
    (ByteaArray, "bytea", {"encode": _bytea}),
    (UuidArray, "uuid", {"encode": attrgetter("bytes")}),
    (JsonbArray, "jsonb", {"encode_in": _jsonb}),
):
    psycopg.adapters.register_dumper(_array, _dumper(_type_name, **_encoder))
