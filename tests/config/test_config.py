"""Configuration: flags, TOKENSVC_* environment, validation at start-up."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tokensvc.config import ConfigError
from tokensvc.config import env as config_env
from tokensvc.config import flags as config_flags


def test_defaults_env_and_flags_merge_in_order():
    env = {"TOKENSVC_ISSUER": "https://env", "TOKENSVC_ACCESS_TTL": "300", "TOKENSVC_INSECURE": "1"}
    parser = __import__("argparse").ArgumentParser()
    config_flags.add_arguments(parser)
    settings = config_env.load(
        parser.parse_args(["--access-ttl", "600", "--audience", "a, b"]), env
    )
    assert settings.issuer == "https://env"  # env beats default
    assert settings.access_ttl == 600  # flag beats env
    assert settings.audience == ("a", "b")
    assert settings.insecure and settings.family_max_age == 30 * 86400


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--insecure", "--access-ttl", "901"], "cap"),
        (["--insecure", "--access-ttl", "0"], "positive"),
        (["--insecure", "--access-ttl", "soon"], "cannot parse"),
        (["--insecure", "--listen", "0.0.0.0:50051"], "loopback"),
        (["--insecure", "--listen", "nonsense"], "HOST:PORT"),
        (["--listen", "127.0.0.1:50051"], "TLS"),
        (["--insecure", "--redis-url", "http://x"], "redis-url"),
        (["--insecure", "--refresh-idle-ttl", "100", "--family-max-age", "50"], "family-max-age"),
        (["--insecure", "--kek-file", "/nonexistent/kek.json"], "not found"),
    ],
)
def test_bad_values_fail_with_one_clear_line(argv, message):
    with pytest.raises(ConfigError, match=message):
        config_env.parse_args(argv)


def test_long_access_ttl_needs_the_explicit_override():
    assert (
        config_env.parse_args(
            ["--insecure", "--access-ttl", "3600", "--allow-long-access-ttl"]
        ).access_ttl
        == 3600
    )


def test_cli_reports_a_bad_value_in_one_line_and_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "tokensvc", "serve", "--insecure", "--access-ttl", "901"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "access-ttl" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_documents_every_setting_and_its_environment_variable():
    out = subprocess.run(
        [sys.executable, "-m", "tokensvc", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    for flag in (
        "--listen",
        "--redis-url",
        "--issuer",
        "--audience",
        "--access-ttl",
        "--refresh-idle-ttl",
        "--family-max-age",
        "--kek-file",
        "--data-dir",
        "--insecure",
    ):
        assert flag in out
    assert "TOKENSVC_REDIS_URL" in out


def test_cli_reports_an_unreachable_redis_in_one_line_and_exit_2(tmp_path):
    from tokensvc.redis.embedded import free_port

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokensvc",
            "serve",
            "--insecure",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(tmp_path),
            "--redis-url",
            f"redis://127.0.0.1:{free_port()}/0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "cannot start" in last and "redis" in last
    assert "Traceback" not in proc.stderr


def test_workers_default_to_the_cpus_in_production_and_one_in_development(tmp_path):
    import os

    from tokensvc.config.env import load

    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    tls = {"TOKENSVC_TLS_CERT": str(cert), "TOKENSVC_TLS_KEY": str(key)}
    assert load(env=tls).workers == (os.cpu_count() or 1)
    assert load(env={**tls, "TOKENSVC_WORKERS": "3"}).workers == 3
    assert load(env={"TOKENSVC_INSECURE": "1"}).workers == 1
    assert load(env={**tls, "TOKENSVC_LISTEN": "127.0.0.1:0"}).workers == 1
