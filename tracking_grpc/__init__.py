"""Live location tracking over gRPC."""

__version__ = "0.1.0"
