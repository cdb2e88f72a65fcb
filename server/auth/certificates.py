"""The subject of a mutual-TLS caller's certificate.

gRPC has already checked the certificate against the client CA
(--tls-client-ca) before any call reaches us; here we only read who it
names, as an RFC 4514 string ("CN=billing-worker,O=Acme"), the form the
api_keys table stores for certificate callers.
"""

import functools

from cryptography import x509


def certificate_subject(auth_context) -> str | None:
    """The RFC 4514 subject of the peer's certificate, or None without one."""
    pems = auth_context.get("x509_pem_cert") if auth_context else None
    if not pems:
        return None
    return _subject_of(bytes(pems[0]))


# Parsing a certificate costs tens of microseconds; a caller keeps its
# certificate for the life of its connection, so the answer is remembered.
@functools.lru_cache(maxsize=1024)
def _subject_of(pem: bytes) -> str | None:
    try:
        return x509.load_pem_x509_certificate(pem).subject.rfc4514_string()
    except ValueError:
        return None
