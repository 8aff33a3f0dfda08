"""The domain: sessions, registry, events, tokens. No gRPC here."""
