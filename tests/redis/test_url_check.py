"""One ``--redis-url`` check: ``serve``'s configuration and every command that takes
``--redis-url`` reject the same URLs with the same message (tokensvc.redis.connection.check_url)."""

from __future__ import annotations

from pathlib import Path

import pytest
from jwcrypto import jwk

from tokensvc.cli import main as cli
from tokensvc.config import Settings
from tokensvc.errors import ConfigError
from tokensvc.redis.connection import ClusterTarget, SentinelTarget, check_url

BAD = [
    ("http://localhost", "must start with one of redis://, rediss://, unix://"),
    ("REDIS://127.0.0.1:6379/0", "must start with one of"),
    ("redis://127.0.0.1:notaport/0", "notaport"),
    ("redis+sentinel://127.0.0.1:26379", "master name is required"),
    ("redis+cluster://127.0.0.1:7000/2", "only database 0"),
]


@pytest.mark.parametrize(("url", "message"), BAD)
def test_every_entry_point_gives_the_same_message(url: str, message: str, tmp_path: Path, capsys):
    with pytest.raises(ConfigError, match=message) as err:
        check_url(url)
    expected = str(err.value)
    assert expected.startswith("--redis-url")

    with pytest.raises(ConfigError) as from_config:
        Settings(insecure=True, redis_url=url).validate()
    assert str(from_config.value) == expected

    kek = tmp_path / "kek.json"
    kek.write_text(jwk.JWK.generate(kty="oct", size=256).export())
    kek.chmod(0o600)
    for argv in (
        ["audit", "tail", "--redis-url", url],
        ["keys", "rewrap", "--redis-url", url, "--kek-file", str(kek)],
    ):
        assert cli.main(argv) == 2
        out, err_text = capsys.readouterr()
        assert out == ""
        assert err_text == f"tokensvc: configuration error: {expected}\n"


def test_good_urls_pass():
    assert check_url("redis://127.0.0.1:6379/0") is None
    assert check_url("rediss://127.0.0.1:6380/0") is None
    assert check_url("unix:///tmp/redis.sock") is None
    assert isinstance(check_url("redis+sentinel://127.0.0.1:26379/main"), SentinelTarget)
    assert isinstance(check_url("redis+cluster://127.0.0.1:7000"), ClusterTarget)
