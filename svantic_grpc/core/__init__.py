"""The domain: sessions, registry, messages, input requests, events, tokens, internal agents
and the store seam (``core.store``) they write against.

No gRPC, no protobuf, no store implementation, no adapter here (``pyproject.toml``'s
import contracts hold that); transports, stores and adapters depend on the core.
"""
