"""Checks of request fields. Every problem found is reported, not just the first."""

import re

from orgbilling.server.errors import invalid_argument

AMOUNT_MAX_MILLICREDITS = 10**15
IDENTIFIER = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
SERVICE_TYPE = re.compile(r"[a-z0-9_.-]{1,64}")
SERVICE_NAME = re.compile(r"[A-Za-z0-9._:@/-]{1,128}")
# A UUID as the server writes it (8-4-4-4-12 hex digits), either case.
UUID_TEXT = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces
METADATA_ENTRIES_MAX = 32
METADATA_KEY_CHARS_MAX = 64
METADATA_VALUE_CHARS_MAX = 1024
TEXT_CHARS_MAX = 1024


class Checks:
    """Collects field violations; `done()` raises INVALID_ARGUMENT if any."""

    def __init__(self):
        self.violations: list[tuple[str, str]] = []

    def fail(self, field: str, description: str) -> None:
        self.violations.append((field, description))

    def matches(self, field: str, value: str, pattern: re.Pattern, what: str) -> None:
        if not pattern.fullmatch(value):
            self.fail(field, f"must be {what}")

    def identifier(self, field: str, value: str) -> None:
        self.matches(field, value, IDENTIFIER, "1 to 128 characters of [A-Za-z0-9._:@-]")

    def service_type(self, field: str, value: str) -> None:
        self.matches(field, value, SERVICE_TYPE, "1 to 64 characters of [a-z0-9_.-]")

    def service_name(self, field: str, value: str) -> None:
        self.matches(field, value, SERVICE_NAME, "1 to 128 characters of [A-Za-z0-9._:@/-]")

    def idempotency_key(self, value: str, field: str = "idempotency_key") -> None:
        self.matches(field, value, IDEMPOTENCY_KEY, "1 to 128 printable ASCII characters")

    def uuid(self, field: str, value: str) -> None:
        self.matches(field, value, UUID_TEXT, "a UUID (8-4-4-4-12 hexadecimal digits)")

    def duration_ms(self, field: str, value, *, minimum_ms: int, maximum_ms: int) -> int | None:
        """A google.protobuf.Duration in whole milliseconds (finer is
        truncated), or None after a field violation when it is malformed or
        out of [minimum_ms, maximum_ms]."""
        valid = (-999_999_999 <= value.nanos <= 999_999_999
                 and not (value.seconds > 0 > value.nanos or value.seconds < 0 < value.nanos))
        milliseconds = value.seconds * 1000 + value.nanos // 1_000_000 if valid else None
        if milliseconds is None or not minimum_ms <= milliseconds <= maximum_ms:
            self.fail(field, f"must be from {minimum_ms / 1000:g} s to {maximum_ms / 1000:g} s")
            return None
        return milliseconds

    def amount(self, field: str, value: int, minimum: int = 1) -> None:
        if not minimum <= value <= AMOUNT_MAX_MILLICREDITS:
            self.fail(field, f"must be from {minimum} to {AMOUNT_MAX_MILLICREDITS}")

    def text(self, field: str, value: str, chars_max: int = TEXT_CHARS_MAX) -> None:
        if len(value) > chars_max:
            self.fail(field, f"must be at most {chars_max} characters")
        if "\x00" in value:
            self.fail(field, "must not contain NUL characters")

    def enum(self, field: str, value: int, enum_type, *, allowed=None) -> None:
        """A value of enum_type other than 0 (unspecified), and one of
        allowed when given (values the server sets but callers may not)."""
        allowed = [v for v in enum_type.values() if v != 0] if allowed is None else list(allowed)
        if value not in allowed:
            names = ", ".join(enum_type.Name(v) for v in allowed)
            self.fail(field, f"must be one of {names}")

    def metadata(self, field: str, entries) -> None:
        if len(entries) > METADATA_ENTRIES_MAX:
            self.fail(field, f"must have at most {METADATA_ENTRIES_MAX} entries")
            return
        for key, value in entries.items():
            if not 1 <= len(key) <= METADATA_KEY_CHARS_MAX or "\x00" in key:
                self.fail(f"{field}[{key[:64]!r}]", f"key must be 1 to {METADATA_KEY_CHARS_MAX} characters, no NUL")
            if len(value) > METADATA_VALUE_CHARS_MAX or "\x00" in value:
                self.fail(f"{field}[{key[:64]!r}]", f"value must be at most {METADATA_VALUE_CHARS_MAX} characters, no NUL")

    def done(self) -> None:
        if self.violations:
            raise invalid_argument(self.violations)
