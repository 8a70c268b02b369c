"""Redis pub/sub in tests: subscribe, and know when events published on the channels reach the client."""

from __future__ import annotations

import time

from redis.asyncio.client import PubSub


async def subscribe_confirmed(pubsub: PubSub, *channels: str, timeout: float = 10.0) -> None:
    """Subscribe ``pubsub`` to ``channels`` and wait until Redis has confirmed each of them: from then on
    every message published on them reaches this client. Without the wait, an event published right
    after ``subscribe`` returns may reach Redis before the subscription does, and is never seen.
    AssertionError if Redis does not confirm in time."""
    await pubsub.subscribe(*channels)
    waiting = set(channels)
    deadline = time.monotonic() + timeout
    while waiting:
        left = deadline - time.monotonic()
        message = await pubsub.get_message(timeout=left) if left > 0 else None
        if message is None:
            raise AssertionError(
                f"Redis did not confirm the subscription to {sorted(waiting)} in {timeout} s"
            )
        assert message["type"] == "subscribe", f"before the subscription was confirmed: {message}"
        channel = message["channel"]
        waiting.discard(channel.decode() if isinstance(channel, bytes) else channel)
