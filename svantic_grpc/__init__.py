"""svantic-grpc: an agent mesh served over gRPC."""

__version__ = "0.1.0"
