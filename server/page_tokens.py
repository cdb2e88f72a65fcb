"""Opaque keyset tokens: where a list page (or an export chunk) ended.

A token is the URL-safe base64 (unpadded) of

    version (1 byte) | position | digest (12 bytes)

where the position is the last row's key, packed by a fixed layout per list
(`Layout`), and the digest is the first 12 bytes of SHA-256 over the list's
name, the request's scope (its organization, filters and range, as the
caller gave them) and the position. So a token presented with other filters,
to another list, or altered (a bit of it, a character of its text) does not
decode, and the caller gets INVALID_ARGUMENT.

No server secret: anyone can make a token that decodes, but every query
filters by the request's own organization, so a forged position can at
worst move the caller within rows it may read anyway (docs/reporting.md).
Replicas need nothing in common to read each other's tokens.
"""

import base64
import binascii
import hashlib
import struct
import uuid

_VERSION = 1
_DIGEST_BYTES = 12


class Layout:
    """How a list packs its position: a string of field kinds, one per field:
    'q' a signed 64-bit integer (times in epoch microseconds, amounts),
    'u' a UUID (given and returned as its text), 's' a string (UTF-8, at most
    65,535 bytes)."""

    def __init__(self, name: str, kinds: str):
        if set(kinds) - set("qus"):
            raise ValueError(f"unknown field kinds in {kinds!r}")
        self.name = name
        self.kinds = kinds

    def _pack(self, position: tuple) -> bytes:
        if len(position) != len(self.kinds):
            raise ValueError(f"{self.name} positions have {len(self.kinds)} fields")
        parts = []
        for kind, value in zip(self.kinds, position):
            if kind == "q":
                parts.append(struct.pack(">q", value))
            elif kind == "u":
                parts.append(uuid.UUID(value).bytes)
            else:
                data = value.encode()
                parts.append(struct.pack(">H", len(data)) + data)
        return b"".join(parts)

    def _unpack(self, data: bytes) -> tuple | None:
        """The position packed in data, or None if data is not exactly one."""
        values, at = [], 0
        for kind in self.kinds:
            if kind == "q":
                if at + 8 > len(data):
                    return None
                values.append(struct.unpack_from(">q", data, at)[0])
                at += 8
            elif kind == "u":
                if at + 16 > len(data):
                    return None
                values.append(str(uuid.UUID(bytes=data[at:at + 16])))
                at += 16
            else:
                if at + 2 > len(data):
                    return None
                (length,) = struct.unpack_from(">H", data, at)
                at += 2
                if at + length > len(data):
                    return None
                values.append(data[at:at + length].decode())
                at += length
        return tuple(values) if at == len(data) else None

    def _digest(self, scope: tuple, packed: bytes) -> bytes:
        hasher = hashlib.sha256()
        # Each part length-prefixed: ("ab", "c") and ("a", "bc") differ.
        for part in (self.name, *map(_scope_text, scope)):
            data = part.encode()
            hasher.update(struct.pack(">I", len(data)) + data)
        hasher.update(packed)
        return hasher.digest()[:_DIGEST_BYTES]

    def encode(self, position: tuple, *, scope: tuple) -> str:
        """The token of `position` for requests of this scope."""
        packed = self._pack(position)
        raw = bytes([_VERSION]) + packed + self._digest(scope, packed)
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    def decode(self, token: str, *, scope: tuple) -> tuple | None:
        """The position in `token`, or None when it is not a token this
        layout made for a request of this scope (the caller reports it)."""
        try:
            text = token.encode("ascii")
            raw = base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
        except (UnicodeError, binascii.Error, ValueError):
            return None
        # Only the one spelling encode() gives: base64 can spell the same bytes
        # several ways (unused low bits of the last character).
        if base64.urlsafe_b64encode(raw).rstrip(b"=") != text:
            return None
        if len(raw) < 1 + _DIGEST_BYTES or raw[0] != _VERSION:
            return None
        packed, digest = raw[1:-_DIGEST_BYTES], raw[-_DIGEST_BYTES:]
        if self._digest(scope, packed) != digest:
            return None
        try:
            return self._unpack(packed)
        except UnicodeDecodeError:  # a digest that matches makes this near impossible
            return None


def _scope_text(value) -> str:
    """One scope value as text; None (a field left unset) differs from ''."""
    return "\x00" if value is None else f"{type(value).__name__}:{value}"


def read_page_size(checks, value: int, *, default: int, maximum: int) -> int:
    """A request's page_size, 0 meaning `default`; out of range is a field
    violation in `checks`."""
    if not 0 <= value <= maximum:
        checks.fail("page_size", f"must be from 0 to {maximum}")
    return value or default


def read_position(checks, layout: Layout, token: str, *, scope: tuple,
                  field: str = "page_token") -> tuple | None:
    """The position a request's token continues after: None for the first
    page; a token this layout did not make for this scope is a field
    violation in `checks`."""
    if not token:
        return None
    position = layout.decode(token, scope=scope)
    if position is None:
        checks.fail(field, "is not a token this call returned for the same organization and filters")
    return position
