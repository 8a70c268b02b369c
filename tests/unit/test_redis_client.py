"""``IOT_REDIS_URL`` for one server or a Redis Cluster, and the clients made from it."""

from __future__ import annotations

import msgspec
import pytest
from redis.asyncio.cluster import RedisCluster

from iot_common.redis_client import as_cluster, cluster_nodes, create_redis, is_cluster_url, pubsub_client
from iot_common.settings import WebSettings

SECRET = "k3Jq9vXz2LmN8pQr5sTu7wYa1bCd4eFg6hIj0"


def test_cluster_urls_are_told_from_single_server_ones() -> None:
    assert is_cluster_url("redis+cluster://a:7000,b:7001")
    assert is_cluster_url("rediss+cluster://user:pw@a:7000")
    assert not is_cluster_url("redis://127.0.0.1:6379/0")
    assert not is_cluster_url("rediss://127.0.0.1:6379/0")


def test_the_seed_nodes_of_a_cluster_url() -> None:
    assert cluster_nodes("redis+cluster://user:p%40ss@a:7000,b:7001, c/") == [
        ("a", 7000),
        ("b", 7001),
        ("c", 6379),
    ]
    assert cluster_nodes("redis+cluster://[::1]:7000") == [("::1", 7000)]
    with pytest.raises(ValueError, match="host:port"):
        cluster_nodes("redis+cluster://")


async def test_a_cluster_url_makes_a_cluster_client_with_its_credentials() -> None:
    # Options of a single-server client that a cluster client does not take are left out.
    client = create_redis("redis+cluster://me:p%40ss@127.0.0.1:7000,127.0.0.2:7001", retry_on_timeout=False)
    cluster = as_cluster(client)
    assert isinstance(cluster, RedisCluster)
    assert sorted(cluster.nodes_manager.startup_nodes) == ["127.0.0.1:7000", "127.0.0.2:7001"]
    kwargs = cluster.nodes_manager.connection_kwargs
    assert (kwargs["username"], kwargs["password"]) == ("me", "p@ss")
    await client.aclose()
    single = create_redis("redis://127.0.0.1:6379/0")
    assert as_cluster(single) is None
    await single.aclose()


async def test_classic_pub_sub_of_a_cluster_goes_to_a_seed_node() -> None:
    client = pubsub_client("redis+cluster://:secret@10.0.0.5:7005,10.0.0.6:7006")
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["password"]) == ("10.0.0.5", 7005, "secret")
    await client.aclose()


@pytest.mark.parametrize(
    "url",
    ["redis+cluster://a:7000,b:7001", "rediss+cluster://u:p@a:7000/", "redis://127.0.0.1:6379/0"],
)
def test_settings_accept_cluster_urls(url: str) -> None:
    assert msgspec.convert({"redis_url": url, "jwt_secret": SECRET}, WebSettings).redis_url == url


def test_settings_refuse_other_schemes() -> None:
    with pytest.raises(msgspec.ValidationError, match="redis_url"):
        msgspec.convert({"redis_url": "redis+sentinel://a:1", "jwt_secret": SECRET}, WebSettings)
