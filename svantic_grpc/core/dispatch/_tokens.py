"""Short-lived signed tokens that travel with each dispatch.

They are EdDSA (Ed25519) JWTs, so an agent verifies them with the mesh's public
key (``AuthService.GetDispatchKeys``) and never holds a secret that could mint
them. Claims: ``iss`` (the mesh), ``aud`` (the instance id), ``tenant_id``,
``agent_type``, ``session_id``, ``dispatch_id`` (also ``jti``), ``iat``, ``exp``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.signing import SigningKey

from svantic_grpc.core.clock import Clock

__all__ = ["DispatchTokens"]

_ALGORITHM = "EdDSA"
_compact = json.JSONEncoder(separators=(",", ":")).encode
"""JSON as PyJWT writes a token's parts (compact, ASCII)."""


def _segment(data: bytes) -> bytes:
    """One part of a compact JWS: base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=")


class DispatchTokens:
    """Signs dispatch tokens and publishes the key that verifies them.

    Args:
        private_key_pem: An Ed25519 private key in PEM; ``None`` makes a new key
            for this process (tokens then stop verifying after a restart).
        issuer: The ``iss`` claim.
        ttl_s: Token lifetime.
    """

    def __init__(
        self, *, clock: Clock, issuer: str, ttl_s: float, private_key_pem: str | None = None
    ) -> None:
        if private_key_pem:
            key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError("the dispatch signing key must be an Ed25519 private key")
        else:
            key = Ed25519PrivateKey.generate()
        self._key = key
        # Signing with libsodium: an Ed25519 signature is deterministic, so the same bytes as
        # ``key.sign`` gives, in about half the CPU (every dispatch to a hosted agent signs one).
        seed = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        self._signing = SigningKey(seed)
        self._clock = clock
        self.issuer = issuer
        self._ttl_s = ttl_s
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self._public_x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        self.key_id = hashlib.sha256(raw).hexdigest()[:16]
        # The header is the same for every token: encoded once (PyJWT would encode it per token).
        self._header = _segment(_compact({"alg": _ALGORITHM, "kid": self.key_id, "typ": "JWT"}).encode())

    def sign(
        self, *, tenant_id: str, agent_type: str, instance_id: str, session_id: str, dispatch_id: str
    ) -> tuple[str, float]:
        """A token for one dispatch, and when it expires."""
        now = self._clock.now()
        expires = int(now + self._ttl_s)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": instance_id,
            "sub": agent_type,
            "tenant_id": tenant_id,
            "agent_type": agent_type,
            "session_id": session_id,
            "dispatch_id": dispatch_id,
            "jti": dispatch_id,
            "iat": int(now),
            "exp": expires,
        }
        # The bytes PyJWT's ``jwt.encode(claims, key, "EdDSA", headers={"kid": ...})`` makes, with
        # the one signature each dispatch needs and none of the per-call header and key work.
        signed = self._header + b"." + _segment(_compact(claims).encode())
        token = signed + b"." + _segment(self._signing.sign(signed).signature)
        return token.decode("ascii"), float(expires)

    @property
    def ttl_s(self) -> float:
        """How long a token is valid after it is signed."""
        return self._ttl_s

    def jwks(self) -> dict[str, Any]:
        """The public key set that verifies these tokens."""
        return {
            "keys": [
                {
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "x": self._public_x,
                    "kid": self.key_id,
                    "alg": _ALGORITHM,
                    "use": "sig",
                }
            ]
        }
