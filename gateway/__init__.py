"""seqguard gateway: asyncio gRPC risk-scoring service."""
