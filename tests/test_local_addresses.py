"""A bind address made dialable in one place; the mesh's keys read from the environment in one place."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from svantic_grpc.config import dial_address, parse_settings, resolve_auth
from tests._support import SIGNING_ENV


@pytest.mark.parametrize(
    ("address", "port", "dialled"),
    [
        ("0.0.0.0:0", 50051, "127.0.0.1:50051"),
        ("[::]:0", 8080, "127.0.0.1:8080"),
        ("127.0.0.2:0", 7, "127.0.0.2:7"),
        ("[::1]:0", 7, "[::1]:7"),
        ("mesh.example.com:443", "443", "mesh.example.com:443"),
    ],
)
def test_a_wildcard_bind_is_dialled_on_loopback(address: str, port: int | str, dialled: str) -> None:
    assert dial_address(address, port) == dialled


def test_the_dispatch_key_is_read_with_the_other_secrets() -> None:
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        .decode()
    )
    settings = parse_settings({"dispatch": {"signing_key_env": "MY_DISPATCH_KEY"}})
    assert resolve_auth(settings, env={**SIGNING_ENV, "MY_DISPATCH_KEY": pem}).dispatch_key_pem == pem
    derived = resolve_auth(settings, env=dict(SIGNING_ENV)).dispatch_key_pem  # none set: derived
    assert derived is not None and derived != pem
