"""Realtime service: a WebSocket gateway that fans Redis pub/sub messages out to clients."""
