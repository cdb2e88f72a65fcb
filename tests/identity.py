"""Identities made by the tests themselves, with no network: an identity
provider (RSA keys, a JWKS, signed JWTs) and a certificate authority (server
and client certificates for TLS and mutual TLS)."""

import base64
import datetime
import ipaddress
import json
import time
import uuid
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

ISSUER = "https://idp.test/realms/orgbilling"
AUDIENCE = "orgbilling"
# The organizations a token acts on unless a test says otherwise: the server
# refuses tokens without the claim by default, as a provider should send it.
ORG_IDS = ("acme",)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class IdentityProvider:
    """Signs JWTs with its RSA keys and publishes them as a JWKS."""

    def __init__(self, issuer: str = ISSUER, audience: str = AUDIENCE):
        self.issuer = issuer
        self.audience = audience
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.kid = self.add_key()

    def add_key(self) -> str:
        kid = uuid.uuid4().hex[:16]
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return kid

    def jwks(self) -> dict:
        published = []
        for kid, key in self.keys.items():
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            published.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        return {"keys": published}

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.jwks()))
        return path

    def public_pem(self, kid: str | None = None) -> bytes:
        return self.keys[kid or self.kid].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def claims(self, scopes=(), subject="service-account-chat", expires_in_s=300, **extra) -> dict:
        now = int(time.time())
        claims = {
            "iss": self.issuer, "aud": [self.audience, "account"], "sub": subject,
            "azp": "chat-api", "iat": now, "exp": now + expires_in_s, "scope": " ".join(scopes),
            "org_ids": list(ORG_IDS),
        }
        claims.update(extra)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, scopes=(), kid: str | None = None, **claims) -> str:
        """A properly signed RS256 token; claims override the defaults (None removes one)."""
        return self.sign(self.claims(scopes, **claims), kid)

    def sign(self, claims: dict, kid: str | None = None) -> str:
        """These exact claims (nulls included), properly signed with RS256."""
        kid = kid or self.kid
        return jwt.encode(claims, self.keys[kid], algorithm="RS256", headers={"kid": kid})

    def unsigned_token(self, scopes=(), **claims) -> str:
        """`alg: none`: no signature at all."""
        header = {"alg": "none", "typ": "JWT", "kid": self.kid}
        body = self.claims(scopes, **claims)
        return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(body).encode())}."

    def hs256_with_public_key(self, scopes=(), **claims) -> str:
        """The algorithm-confusion attack: HS256 "signed" with the public key
        as the HMAC secret, hoping the server verifies with that key as HMAC."""
        import hashlib
        import hmac

        header = {"alg": "HS256", "typ": "JWT", "kid": self.kid}
        signing_input = (
            f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(self.claims(scopes, **claims)).encode())}"
        )
        signature = hmac.new(self.public_pem(), signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{_b64(signature)}"


class CertificateAuthority:
    """A CA that issues server and client certificates, as PEM bytes."""

    def __init__(self, name: str = "orgbilling test CA"):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self.name).issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, server: bool = False, organization: str | None = None
              ) -> tuple[bytes, bytes]:
        """(certificate PEM, private key PEM) for a server on 127.0.0.1 /
        localhost, or for a client."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        if organization:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes)).issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [x509.ExtendedKeyUsageOID.SERVER_AUTH if server else x509.ExtendedKeyUsageOID.CLIENT_AUTH]
            ), critical=False)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return certificate.public_bytes(serialization.Encoding.PEM), key_pem
