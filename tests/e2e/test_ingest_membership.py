"""Several ingest replicas in one share group on a real Mosquitto, under load: a replica that is stopped
(scale-in) leaves no session behind, and the session of a replica that goes silent (frozen with SIGSTOP,
as a host cut off the network) is adopted by a peer, which stores what the broker had queued for it while
it is still gone. Every PUBACKed reading is stored exactly once in both cases.

Mosquitto gives a shared subscription's messages round-robin to every session of the group, connected or
not (see ``iot_ingest.membership``): without leaving and adopting, a third of the readings would wait in
the absent replica's session.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import asyncpg
import gmqtt
import pytest
from gmqtt.mqtt.constants import MQTTv50

from iot_testkit.loadgen import device_ids
from iot_testkit.processes import Broker, ServiceProcess, Start, free_port
from iot_testkit.publisher import read_published, start_publisher
from iot_testkit.waiting import wait_for

RATE = 400.0


async def stored_seqs(db: asyncpg.Connection[Any], prefix: str) -> dict[int, int]:
    rows = await db.fetch(
        "SELECT value::bigint AS seq, count(*) AS n FROM telemetry "
        "WHERE metric = 'seq' AND device_id LIKE $1 GROUP BY 1",
        prefix + "-%",
    )
    return {int(r["seq"]): int(r["n"]) for r in rows}


async def session_present(broker: Broker, client_id: str) -> bool:
    """Whether the broker still holds a session for ``client_id`` (resuming it, then leaving it as it was)."""
    client = gmqtt.Client(client_id, clean_session=False, session_expiry_interval=3600)
    flags: list[bool] = []
    client.on_connect = lambda _c, f, _rc, _p: flags.append(bool(f))
    await client.connect("127.0.0.1", broker.port, version=MQTTv50)
    await wait_for(lambda: bool(flags), 10, "CONNACK")
    await client.disconnect()
    return flags[0]


class Group:
    def __init__(self, start: Start, database_url: str, broker: Broker, redis_url: str, unique: str) -> None:
        self.start, self.database_url, self.broker = start, database_url, broker
        self.redis_url, self.unique = redis_url, unique
        self.replicas: dict[str, tuple[ServiceProcess, int]] = {}

    async def add(self, name: str) -> None:
        port = free_port()
        env = {
            "IOT_DATABASE_URL": self.database_url,
            "IOT_REDIS_URL": self.redis_url,
            "IOT_REDIS_PREFIX": f"t{self.unique}",
            "IOT_MQTT_URL": self.broker.url,
            "IOT_MQTT_SHARE_GROUP": f"g{self.unique}",
            "IOT_MQTT_CLIENT_ID": f"{self.unique}-{name}",
            "IOT_INGEST_HTTP_PORT": str(port),
            "IOT_INGEST_HEARTBEAT_S": "0.5",
            "IOT_INGEST_PEER_DEAD_AFTER_S": "3",
            "IOT_DATABASE_POOL_MIN": "1",
            "IOT_DATABASE_POOL_MAX": "3",
            "IOT_LOG_LEVEL": "info",
        }
        proc = self.start("iot-ingest", env)
        await asyncio.to_thread(proc.wait_http, f"http://127.0.0.1:{port}/readyz")
        self.replicas[name] = (proc, port)


async def publish(broker: Broker, prefix: str, messages: int, offset: int, out: Path) -> list[int]:
    proc = start_publisher(broker.url, prefix, 10, messages, RATE, offset, out)
    await asyncio.to_thread(proc.wait, 120)
    return read_published(out).acked_seqs


@pytest.mark.timeout(150)
async def test_scale_in_leaves_no_session_and_a_silent_replica_is_adopted(
    service: Start,
    database_url: str,
    redis_url: str,
    db: asyncpg.Connection[Any],
    unique: str,
    tmp_path: Path,
) -> None:
    prefix = f"mem-{unique}"
    await db.execute("INSERT INTO devices (id) SELECT unnest($1::text[])", device_ids(prefix, 10))
    broker = Broker().start()
    try:
        group = Group(service, database_url, broker, redis_url, unique)
        for name in ("a", "b", "c"):
            await group.add(name)

        # Scale-in: c is stopped while readings flow; it leaves the group and ends its session.
        publishing = asyncio.create_task(publish(broker, prefix, int(RATE * 4), 0, tmp_path / "p1.json"))
        await asyncio.sleep(1.5)
        stopped = group.replicas["c"][0]
        assert await asyncio.to_thread(stopped.stop) == 0
        assert any("left the share group" in line for line in stopped.log_lines()), stopped.logs()
        acked = set(await publishing)
        assert len(acked) == int(RATE * 4)

        async def all_stored() -> bool:
            return acked <= (await stored_seqs(db, prefix)).keys()

        await wait_for(all_stored, 30, "every PUBACKed reading stored after the scale-in")
        assert not await session_present(broker, f"{unique}-c"), "the stopped replica's session is left"

        # A silent replica: b is frozen (its connections stay open, nothing answers, as on a cut host).
        frozen = group.replicas["b"][0]
        publishing = asyncio.create_task(
            publish(broker, prefix, int(RATE * 8), 100_000, tmp_path / "p2.json")
        )
        await asyncio.sleep(1.0)
        assert frozen.proc is not None
        frozen.proc.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            acked |= set(await publishing)
            # Stored while b is still frozen: a reads what the broker queued for b's session.
            await wait_for(all_stored, 40, "every PUBACKed reading stored while a replica is silent")
            assert time.monotonic() - frozen_at < 60
        finally:
            frozen.proc.send_signal(signal.SIGCONT)
        adopter = group.replicas["a"][0]
        await asyncio.to_thread(adopter.wait_log, "adopted the session of a silent ingest replica", 10)
        assert any('"outcome":"emptied"' in line for line in adopter.log_lines()), adopter.logs()

        # b comes back, subscribes again, and takes its share of new readings.
        await asyncio.to_thread(frozen.wait_http, f"http://127.0.0.1:{group.replicas['b'][1]}/readyz", 30)
        acked |= set(await publish(broker, prefix, int(RATE * 3), 200_000, tmp_path / "p3.json"))
        await wait_for(all_stored, 30, "every PUBACKed reading stored after the replica came back")
        back = group.replicas["b"][0]
        assert any("mqtt connected" in line for line in back.log_lines()[-50:]), back.logs()
    finally:
        broker.close()
