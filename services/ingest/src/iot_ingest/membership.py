"""The share group's membership: which ingest replicas are alive, so that no MQTT session is left holding
messages nobody will collect.

Mosquitto (2.0) hands a shared subscription's messages round-robin to every session in the group, also to
a session whose client is offline: those messages queue in that session until the client returns or the
session expires, and then they are gone. Two things follow, both decided here:

- **leaving** (scale-in, or any graceful stop while other replicas run): a replica that is not the last
  one unsubscribes, finishes what it was sent and ends its session (session expiry 0 on DISCONNECT), so
  nothing queues for it; the last replica keeps its session instead, so that readings queue for it while
  it restarts. :meth:`Membership.leave` decides atomically, so two replicas stopping at once do not both
  leave;
- **adopting** (a host cut off or killed): a replica silent for ``IOT_INGEST_PEER_DEAD_AFTER_S`` is taken
  as gone; one peer connects with its client id, which resumes its session (and the messages queued and
  in flight in it), stores them, unsubscribes and ends the session. A replica that comes back later
  subscribes again on its new connection.

Replicas record a heartbeat in a sorted set scored by Redis server time (``{prefix}:ingest:members``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from typing import Final

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from iot_common.topics import RedisNames
from iot_ingest import metrics
from iot_ingest.consumer import Consumer

log = structlog.get_logger("iot_ingest.membership")

# KEYS[1] members; ARGV[1] client id. Records the heartbeat at Redis server time.
_BEAT: Final = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) + tonumber(t[2]) / 1e6, ARGV[1])
return 1
"""

# KEYS[1] members; ARGV[1] client id, ARGV[2] dead after (s). Leaves (1) only if another member is alive.
_LEAVE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local others = redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[2]), '+inf')
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  local mine = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
  if mine >= now - tonumber(ARGV[2]) then others = others - 1 end
end
if others > 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
"""

# KEYS[1] members; ARGV[1] dead after (s). The members silent for longer.
_SILENT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[1])))
"""

# KEYS[1] members; ARGV[1] client id, ARGV[2] dead after (s). Forgets it unless it beat again meanwhile.
_FORGET: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) < now - tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""


class Membership:
    """This replica's place in the share group (see the module)."""

    def __init__(self, redis: Redis, names: RedisNames, client_id: str, *, dead_after_s: float) -> None:
        self._redis = redis
        self._names = names
        self.client_id = client_id
        self.dead_after_s = dead_after_s
        self._beat = redis.register_script(_BEAT)
        self._leave = redis.register_script(_LEAVE)
        self._silent = redis.register_script(_SILENT)
        self._forget = redis.register_script(_FORGET)

    async def beat(self) -> None:
        await self._beat(keys=[self._names.ingest_members], args=[self.client_id])

    async def leave(self) -> bool:
        """Leave the group if another replica is alive (True); False: this is the last one, it stays."""
        left = await self._leave(keys=[self._names.ingest_members], args=[self.client_id, self.dead_after_s])
        return bool(left)

    async def silent_peers(self) -> list[str]:
        """Client ids of the members whose heartbeat is older than ``dead_after_s`` (never this one)."""
        ids = await self._silent(keys=[self._names.ingest_members], args=[self.dead_after_s])
        out = [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
        return [i for i in out if i != self.client_id]

    async def claim(self, peer: str, hold_s: float) -> bool:
        """Take the right to adopt ``peer``'s session for ``hold_s`` seconds (one replica at a time)."""
        return bool(
            await self._redis.set(
                self._names.ingest_adoption_lock(peer), self.client_id, nx=True, px=int(hold_s * 1000)
            )
        )

    async def forget(self, peer: str) -> bool:
        """Remove ``peer`` once its session is emptied, unless it beat again meanwhile (it is back)."""
        return bool(await self._forget(keys=[self._names.ingest_members], args=[peer, self.dead_after_s]))


QUIET_S: Final = 1.0
"""A session is taken as emptied once nothing is in flight and no message came for this long."""
UNSUBSCRIBE_TIMEOUT_S: Final = 5.0
CONNECT_TIMEOUT_S: Final = 10.0
ADOPTION_HOLD_S: Final = 120.0
"""How long a claim on a silent peer lasts (one replica adopts it; retried after this if it failed)."""
EMPTY_TIMEOUT_S: Final = 90.0


async def leave_group(membership: Membership, consumer: Consumer, timeout_s: float) -> bool:
    """On a graceful stop: leave the share group if another replica is alive (unsubscribe, store what was
    sent, then the caller ends the session). True when the session may be ended; False to keep it (the
    last replica, Redis or the broker unreachable, or what was sent could not be stored in time: then
    the heartbeat is renewed so that a peer adopts the session once this process is gone)."""
    if not consumer.mqtt.is_connected:
        return False
    try:
        if not await membership.leave():
            log.info("last ingest replica of the share group: keeping the session for the restart")
            return False
    except (RedisError, OSError) as exc:
        log.warning("share group membership unavailable: keeping the session", error=str(exc))
        return False
    if await consumer.unsubscribe(UNSUBSCRIBE_TIMEOUT_S) and await consumer.wait_quiet(QUIET_S, timeout_s):
        log.info("left the share group; ending the session")
        return True
    log.warning("could not empty the session before stopping; keeping it for a peer to adopt")
    with contextlib.suppress(RedisError, OSError):
        await membership.beat()
    return False


async def adopt(membership: Membership, peer: str, adopter: Consumer) -> str:
    """Resume ``peer``'s session, store what is queued and in flight in it, unsubscribe, end it.
    Returns the outcome: ``emptied``, ``taken_back`` (the peer reconnected meanwhile) or ``failed``."""
    try:
        return await _adopt(membership, peer, adopter)
    except asyncio.CancelledError:
        await adopter.disconnect()
        raise
    except (RedisError, OSError) as exc:
        await adopter.disconnect()
        metrics.SESSIONS_ADOPTED.labels("failed").inc()
        log.warning("adopting a silent replica's session failed", peer=peer, error=str(exc))
        return "failed"


async def _adopt(membership: Membership, peer: str, adopter: Consumer) -> str:
    try:
        await asyncio.wait_for(adopter.connect(asyncio.Event()), CONNECT_TIMEOUT_S)
    except TimeoutError:
        await adopter.disconnect()
        metrics.SESSIONS_ADOPTED.labels("failed").inc()
        log.warning("could not connect to adopt a silent replica's session", peer=peer)
        return "failed"
    outcome = "emptied"
    if adopter.session_present and not (
        await adopter.unsubscribe(UNSUBSCRIBE_TIMEOUT_S)
        and await adopter.wait_quiet(QUIET_S, EMPTY_TIMEOUT_S)
    ):
        outcome = "taken_back" if not adopter.mqtt.is_connected else "failed"
    await adopter.disconnect(end_session=outcome == "emptied")
    if outcome == "emptied":
        await membership.forget(peer)
    metrics.SESSIONS_ADOPTED.labels(outcome).inc()
    log.warning(
        "adopted the session of a silent ingest replica",
        peer=peer,
        outcome=outcome,
        session_present=adopter.session_present,
        messages=adopter.received,
    )
    return outcome


class Adoptions:
    """The periodic heartbeat, and an adoption task for each silent peer this replica claims."""

    def __init__(self, membership: Membership, open_adopter: Callable[[str], Consumer]) -> None:
        self._membership = membership
        self._open_adopter = open_adopter
        self._tasks: dict[str, asyncio.Task[str]] = {}
        self._closed = False

    async def tick(self) -> None:
        if self._closed:
            return
        await self._membership.beat()
        for peer in await self._membership.silent_peers():
            if peer in self._tasks or not await self._membership.claim(peer, ADOPTION_HOLD_S):
                continue
            task = asyncio.create_task(adopt(self._membership, peer, self._open_adopter(peer)))
            self._tasks[peer] = task
            task.add_done_callback(functools.partial(self._done, peer))

    def _done(self, peer: str, _task: asyncio.Task[str]) -> None:
        self._tasks.pop(peer, None)

    async def close(self) -> None:
        """Stop adopting: a session being emptied is left as it is (a peer adopts it after the claim)."""
        self._closed = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
