from __future__ import annotations

import pytest

from iot_common.auth import (
    InvalidCredential,
    Principal,
    api_key_prefix,
    decode_token,
    generate_api_key,
    hash_api_key,
    issue_token,
)

SECRET = "unit-test-secret-0123456789abcdefghij"


def test_a_token_round_trips_with_its_scopes() -> None:
    token = issue_token(SECRET, "user-1", {"read", "write"}, ttl_s=60)
    principal = decode_token(SECRET, token)
    assert principal == Principal("user-1", "user", frozenset({"read", "write"}))


def test_expired_wrong_secret_and_wrong_type_are_refused() -> None:
    with pytest.raises(InvalidCredential, match="expired"):
        decode_token(SECRET, issue_token(SECRET, "u", {"read"}, ttl_s=-10))
    with pytest.raises(InvalidCredential, match="invalid token"):
        decode_token("another-secret-0123456789abcdefghijkl", issue_token(SECRET, "u", {"read"}, ttl_s=60))
    realtime = issue_token(SECRET, "u", {"read"}, ttl_s=60, token_type="realtime")
    with pytest.raises(InvalidCredential, match="not accepted"):
        decode_token(SECRET, realtime)
    assert decode_token(SECRET, realtime, accept=("realtime", "access")).subject == "u"


def test_scopes_imply_each_other_upwards_only() -> None:
    admin = Principal("a", "user", frozenset({"admin"}))
    writer = Principal("w", "api_key", frozenset({"write"}))
    reader = Principal("r", "api_key", frozenset({"read"}))
    assert admin.allows("read")
    assert admin.allows("write")
    assert admin.allows("admin")
    assert writer.allows("read")
    assert writer.allows("write")
    assert not writer.allows("admin")
    assert reader.allows("read")
    assert not reader.allows("write")


def test_api_keys_are_stored_as_prefix_and_hash() -> None:
    key, prefix, digest = generate_api_key()
    assert api_key_prefix(key) == prefix
    assert digest == hash_api_key(key)
    assert key not in digest
    assert api_key_prefix("iotk_short_x") is None
    assert api_key_prefix("Bearer abc") is None
