import datetime as dt

import pytest

from dailydoco.protocol import Forbidden, Unauthorized
from dailydoco.serve.auth import TokenAuthority, TokenEnded, load_or_create_secrets, require_reader_of


@pytest.fixture
def authority(tmp_path):
    return TokenAuthority(load_or_create_secrets(str(tmp_path)))


def test_secrets_persist_and_are_private(tmp_path):
    first = load_or_create_secrets(str(tmp_path))
    assert load_or_create_secrets(str(tmp_path)) == first
    assert (tmp_path / "secrets.json").stat().st_mode & 0o077 == 0


def test_token_round_trip_and_scope(authority):
    token, _ = authority.issue("alice", 60)
    assert token.startswith("v4.public.")
    for authorization in (f"Bearer {token}", f"bearer {token}", f"BEARER  {token} "):
        assert authority.principal(authorization, None) == "user:alice"
    for authorization in ("Bearer", "Bearer ", f"Basic {token}", f"Bearer{token}"):
        with pytest.raises(Unauthorized):
            authority.principal(authorization, None)
    require_reader_of("user:alice", "alice")
    with pytest.raises(Forbidden):
        require_reader_of("user:alice", "alice2")


def test_tampered_expired_and_foreign_tokens_fail(authority, tmp_path):
    token, _ = authority.issue("alice", 60)
    body = token[len("v4.public."):]
    flipped = body[:10] + ("A" if body[10] != "A" else "B") + body[11:]
    # The same bytes spelt otherwise: padded, or with characters outside the
    # alphabet, which Python's base64 decoder would skip.
    respelt = (token + "=", token + "==", token[:20] + "!" + token[20:], token[:20] + "\n" + token[20:], token + "+")
    for bad in ("v4.public." + flipped, token + ".footer", "v3.public." + body, "garbage", *respelt):
        with pytest.raises(Unauthorized):
            authority.verify(bad)
    with pytest.raises(Unauthorized):
        authority.verify(token, now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=61))
    other = TokenAuthority(load_or_create_secrets(str(tmp_path / "other")))
    with pytest.raises(Unauthorized):
        other.verify(token)


def test_api_keys(authority, tmp_path):
    secrets = load_or_create_secrets(str(tmp_path))
    assert authority.principal(None, secrets.service_api_key) == "service"
    assert authority.principal(None, secrets.admin_api_key) == "admin"
    with pytest.raises(Unauthorized):
        authority.principal(None, secrets.service_api_key + "x")
    with pytest.raises(Unauthorized):
        authority.principal(None, None)


def test_revocation_refuses_tokens_issued_at_or_before_it(authority):
    issued_at = dt.datetime(2026, 11, 24, 12, 0, 0, 500_000, tzinfo=dt.timezone.utc)
    before, _ = authority.issue("alice", 3600, now=issued_at)
    bob, _ = authority.issue("bob", 3600, now=issued_at)
    assert authority.revoke("alice", issued_at)
    assert not authority.revoke("alice", issued_at - dt.timedelta(seconds=1))  # an older one changes nothing
    with pytest.raises(TokenEnded, match="revoked"):
        authority.verify(before, now=issued_at)
    # Issued a microsecond later: the same second, but after the revocation.
    after, _ = authority.issue("alice", 3600, now=issued_at + dt.timedelta(microseconds=1))
    assert authority.verify(after, now=issued_at).sub == "alice"
    assert authority.verify(bob, now=issued_at).sub == "bob"
    with pytest.raises(TokenEnded, match="expired"):
        authority.verify(after, now=issued_at + dt.timedelta(hours=2))


def test_a_token_verified_before_is_still_refused_once_expired_or_revoked(authority):
    issued_at = dt.datetime.now(dt.timezone.utc)
    token, _ = authority.issue("alice", 60, now=issued_at)
    assert authority.verify(token, now=issued_at).sub == "alice"  # its signature is checked once, here
    with pytest.raises(TokenEnded, match="expired"):
        authority.verify(token, now=issued_at + dt.timedelta(seconds=61))
    authority.revoke("alice", issued_at)
    with pytest.raises(TokenEnded, match="revoked"):
        authority.verify(token, now=issued_at)
    # A token one character off is a different token: checked, and refused.
    body = token[len("v4.public."):]
    with pytest.raises(Unauthorized):
        authority.verify("v4.public." + body[:-3] + ("A" if body[-3] != "A" else "B") + body[-2:])


def test_verified_tokens_are_remembered_up_to_a_bound(authority, monkeypatch):
    from dailydoco.serve import auth

    monkeypatch.setattr(auth, "VERIFIED_TOKENS_MAX", 3)
    tokens = [authority.issue(f"user{i}", 60)[0] for i in range(5)]
    for token in tokens:
        authority.verify(token)
    assert list(authority._verified) == tokens[2:]  # the oldest went first
    checks = []
    real = authority._verify_signed
    monkeypatch.setattr(authority, "_verify_signed", lambda t: checks.append(t) or real(t))
    authority.verify(tokens[4])
    authority.verify(tokens[0])
    assert checks == [tokens[0]]  # a remembered token skips the signature check; a forgotten one does not
