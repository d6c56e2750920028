"""TokenClient and AsyncTokenClient against the real service, and the channel helpers."""

from __future__ import annotations

import asyncio
import datetime
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tokensvc.redis.embedded import free_port
from tokensvc_client import (
    AsyncTokenClient,
    InvalidArgument,
    KeySet,
    TokenClient,
    Unauthenticated,
    Unavailable,
    channel,
)


def test_issue_returns_a_typed_pair_with_epoch_expiries(client):
    before = time.time()
    pair = client.issue(
        "alice",
        roles=["reader"],
        client_id="web",
        acr="mfa",
        amr=["pwd"],
        auth_time=datetime.datetime(2024, 1, 2, tzinfo=datetime.UTC),
        session_label="laptop",
    )
    assert pair.token_type == "Bearer" and pair.session_id
    assert pair.refresh_token.startswith("tsr1_") and pair.access_token.count(".") == 2
    assert before - 1 < pair.access_expires_at - 900 <= time.time()
    assert pair.refresh_expires_at > pair.access_expires_at
    info = client.introspect(pair.access_token)
    assert info.active and info.token_type == "access"
    assert (info.subject, info.roles, info.client_id, info.acr, info.amr) == (
        "alice",
        ("reader",),
        "web",
        "mfa",
        ("pwd",),
    )
    assert info.audience == ("mesh",) and info.session_id == pair.session_id
    assert info.expires_at == pair.access_expires_at and info.issued_at is not None


def test_tokens_never_appear_in_repr(client):
    pair = client.issue("alice")
    text = repr(pair)
    assert pair.access_token not in text and pair.refresh_token not in text
    assert pair.session_id in text


def test_refresh_rotates_and_keeps_the_session(client):
    pair = client.issue("alice", audience=["billing"])
    new = client.refresh(pair.refresh_token)
    assert new.session_id == pair.session_id
    assert new.refresh_token != pair.refresh_token and new.access_token != pair.access_token
    assert client.introspect(new.access_token).audience == ("billing",)


def test_revoke_session_and_introspect_inactive(client):
    pair = client.issue("alice")
    assert client.revoke(session_id=pair.session_id, reason="test") == 1
    assert client.introspect(pair.access_token).active is False
    assert client.introspect(pair.refresh_token).active is False


def test_revoke_subject_and_access_token(client):
    first, second = client.issue("carol"), client.issue("carol")
    assert client.revoke(token=first.access_token) == 0
    assert not client.introspect(first.access_token).active
    assert client.introspect(second.access_token).active
    assert client.revoke(subject="carol") == 2


@pytest.mark.parametrize(
    "targets", [{}, {"token": "t", "subject": "s"}, {"session_id": "a", "subject": "b"}]
)
def test_revoke_needs_exactly_one_target(client, targets):
    with pytest.raises(ValueError, match="exactly one"):
        client.revoke(**targets)


def test_get_keys_returns_a_usable_key_set(client, tokensvc):
    jwks = client.get_keys()
    assert jwks.max_age_seconds == tokensvc.settings.jwks_max_age
    assert isinstance(jwks.key_set(), KeySet) and len(jwks.key_set()) >= 1


def test_status_codes_become_library_errors(client):
    with pytest.raises(InvalidArgument, match="subject") as err:
        client.issue("")
    assert isinstance(err.value.__cause__, grpc.RpcError)
    with pytest.raises(Unauthenticated):
        client.refresh("garbage")
    pair = client.issue("alice")
    client.refresh(pair.refresh_token)
    with pytest.raises(Unauthenticated):  # reuse of a spent refresh token
        client.refresh(pair.refresh_token)


def test_unreachable_service_is_unavailable():
    dead = TokenClient(f"127.0.0.1:{free_port()}", insecure=True, timeout=0.5)
    with dead, pytest.raises(Unavailable):
        dead.get_keys()


def test_client_rejects_bad_arguments():
    with pytest.raises(ValueError, match="timeout"):
        TokenClient("127.0.0.1:1", insecure=True, timeout=0)
    plain = grpc.insecure_channel("127.0.0.1:1")
    with pytest.raises(ValueError, match="only apply to a target"):
        TokenClient(plain, insecure=True)
    plain.close()


def test_async_client_covers_every_method_and_maps_errors(tokensvc):
    async def scenario() -> None:
        async with AsyncTokenClient(tokensvc.target, insecure=True) as aclient:
            pair = await aclient.issue("alice", roles=["r"], auth_time=1_700_000_000)
            info = await aclient.introspect(pair.access_token)
            assert info.active and info.subject == "alice" and info.roles == ("r",)
            new = await aclient.refresh(pair.refresh_token)
            assert new.session_id == pair.session_id
            jwks = await aclient.get_keys()
            assert len(jwks.key_set()) >= 1
            assert await aclient.revoke(session_id=pair.session_id) == 1
            assert not (await aclient.introspect(new.access_token)).active
            with pytest.raises(InvalidArgument):
                await aclient.issue("")
            with pytest.raises(Unauthenticated):
                await aclient.refresh(pair.refresh_token)

    asyncio.run(scenario())


def test_async_client_on_a_given_channel_leaves_it_open(tokensvc):
    async def scenario() -> None:
        ch = grpc.aio.insecure_channel(tokensvc.target)
        aclient = AsyncTokenClient(ch, timeout=2)
        await aclient.close()
        assert (await AsyncTokenClient(ch).get_keys()).max_age_seconds > 0
        await ch.close()

    asyncio.run(scenario())


# -- TLS ---------------------------------------------------------------------------------


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None, signer
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), True)
    )
    if issuer is not None:
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            False,
        )
    return builder.sign(signer, hashes.SHA256())


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    out: dict[str, Path] = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test ca", ca_key, None, ca_key)
    out["ca"] = tmp_path / "ca.pem"
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(who, key, ca, ca_key)
        out[f"{who}_cert"] = tmp_path / f"{who}.pem"
        out[f"{who}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{who}_key"] = tmp_path / f"{who}.key"
        out[f"{who}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return out


def test_token_client_over_mutual_tls(make_settings, start_server, pki, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text('[rpc.Issue]\nallow = ["cn:client"]\n')  # the certificate's CN
    srv = start_server(
        make_settings(
            insecure=False,
            tls_cert=pki["server_cert"],
            tls_key=pki["server_key"],
            tls_client_ca=pki["ca"],
            policy_file=policy,
            allow_cn_identities=True,
        )
    )
    target = f"127.0.0.1:{srv.port}"
    with TokenClient(
        target, ca=pki["ca"], cert=pki["client_cert"], key=pki["client_key"].read_bytes()
    ) as tls:
        assert tls.issue("alice").session_id
    for wrong in (
        TokenClient(target, ca=str(pki["ca"]), timeout=2),  # no client certificate
        TokenClient(target, insecure=True, timeout=2),  # plaintext
    ):
        with wrong, pytest.raises(Unavailable):
            wrong.get_keys()


def test_channel_helper_refuses_contradictions(pki):
    with pytest.raises(ValueError, match="together"):
        channel("127.0.0.1:1", cert=pki["client_cert"])
    with pytest.raises(ValueError, match="insecure"):
        channel("127.0.0.1:1", insecure=True, ca=pki["ca"])
