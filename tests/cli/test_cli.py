"""`tokensvc certs` and the JSON log formatter (`tokensvc audit tail`: observe/test_audit.py)."""

from __future__ import annotations

import json
import logging
import shlex
import stat

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tokensvc.cli import main as cli
from tokensvc.cli.devcerts import DEFAULT_WORKLOADS
from tokensvc.config import env as config_env
from tokensvc.observe import logs

KEYS = ("server", *DEFAULT_WORKLOADS)


def _cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certs_writes_the_development_pki(tmp_path, capsys):
    directory = tmp_path / "certs dir"  # a space: the printed commands must quote it
    assert cli.main(["certs", str(directory)]) == 0
    out, err = capsys.readouterr()
    assert err == ""

    names = {p.name for p in directory.iterdir()}
    assert names == {"ca.pem"} | {f"{n}.pem" for n in KEYS} | {f"{n}.key" for n in KEYS}
    for name in KEYS:
        assert stat.S_IMODE((directory / f"{name}.key").stat().st_mode) == 0o600

    ca = _cert(directory / "ca.pem")
    server = _cert(directory / "server.pem")
    assert server.issuer == ca.subject
    server_sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in server_sans.get_values_for_type(x509.DNSName)
    for name, spiffe_id in DEFAULT_WORKLOADS.items():
        cert = _cert(directory / f"{name}.pem")
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe_id]
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]

    # the default output is a table of the files: a header, then one row per file
    lines = out.splitlines()
    assert lines[0].split() == ["PATH", "KIND", "IDENTITY", "EXPIRES_AT"]
    table = {line.split("  ")[0]: line for line in lines[1 : 2 + 2 * len(KEYS)]}
    assert set(table) == {str(p) for p in directory.iterdir()}
    assert "client_cert" in table[str(directory / "orders.pem")]
    assert DEFAULT_WORKLOADS["orders"] in table[str(directory / "orders.key")]

    # the printed example is a valid `tokensvc serve` command line for these files
    (serve_line,) = [line for line in out.splitlines() if "tokensvc serve" in line]
    argv = shlex.split(serve_line)
    assert argv[:2] == ["tokensvc", "serve"]
    settings = config_env.parse_args(argv[2:])
    assert settings.tls_cert == directory / "server.pem"
    assert settings.tls_key == directory / "server.key"
    assert settings.tls_client_ca == directory / "ca.pem"
    assert settings.listen == "127.0.0.1:50051"
    (health_line,) = [line for line in out.splitlines() if "tokensvc health" in line]
    assert shlex.split(health_line)[-4:] == [
        "--cert",
        str(directory / "admin.pem"),
        "--key",
        str(directory / "admin.key"),
    ]


def test_certs_json_is_one_object_per_file(tmp_path, capsys):
    directory = tmp_path / "certs"
    assert cli.main(["certs", str(directory), "--output", "json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # nothing else
    assert {row["path"] for row in rows} == {str(p) for p in directory.iterdir()}
    by_path = {row["path"]: row for row in rows}
    ca = _cert(directory / "ca.pem")
    assert by_path[str(directory / "ca.pem")] == {
        "path": str(directory / "ca.pem"),
        "kind": "ca_cert",
        "identity": "tokensvc development CA",
        "expires_at": int(ca.not_valid_after_utc.timestamp()),
    }
    assert by_path[str(directory / "server.key")]["kind"] == "server_key"
    assert by_path[str(directory / "server.pem")]["identity"] == "localhost,127.0.0.1,::1"
    for name, spiffe_id in DEFAULT_WORKLOADS.items():
        for suffix, kind in ((".pem", "client_cert"), (".key", "client_key")):
            row = by_path[str(directory / f"{name}{suffix}")]
            assert (row["kind"], row["identity"]) == (kind, spiffe_id)
            assert isinstance(row["expires_at"], int)


def test_certs_for_other_hosts(tmp_path, capsys):
    directory = tmp_path / "certs"
    assert (
        cli.main(["certs", str(directory), "--host", "tokensvc.internal", "--host", "10.1.2.3"])
        == 0
    )
    out = capsys.readouterr().out
    server = _cert(directory / "server.pem")
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["tokensvc.internal"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert "--listen 0.0.0.0:50051" in out  # not loopback: the example listens on all
    assert "--target tokensvc.internal:50051" in out


def test_certs_into_an_unusable_directory_is_one_line_exit_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert cli.main(["certs", str(blocker / "certs")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("tokensvc: cannot write certificates:")
    assert err.count("\n") == 1


def test_json_formatter_renders_extra_fields_as_keys():
    record = logging.LogRecord("tokensvc.x", logging.INFO, __file__, 1, "hello %s", ("w",), None)
    record.__dict__.update(
        {"session_id": "s1", "count": 3, "ok": True, "obj": object(), "level": "spoofed"}
    )
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["msg"] == "hello w"
    assert (line["session_id"], line["count"], line["ok"]) == ("s1", 3, True)
    assert line["obj"].startswith("<object object")  # not JSON: rendered as text
    assert line["level"] == "INFO"  # an extra never replaces the line's own keys
    for attr in ("args", "pathname", "lineno", "thread", "process", "created"):
        assert attr not in line


def test_json_formatter_without_extras_is_unchanged():
    record = logging.LogRecord("tokensvc.x", logging.WARNING, __file__, 1, "plain", (), None)
    line = json.loads(logs.JsonFormatter().format(record))
    assert set(line) == {"ts", "level", "logger", "msg"}


def test_certs_twice_keeps_the_working_ca_unless_forced(tmp_path, capsys):
    directory = tmp_path / "certs"
    assert cli.main(["certs", str(directory)]) == 0
    ca = (directory / "ca.pem").read_bytes()
    capsys.readouterr()
    assert cli.main(["certs", str(directory)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err
    assert (directory / "ca.pem").read_bytes() == ca
    assert cli.main(["certs", str(directory), "--force"]) == 0
    assert (directory / "ca.pem").read_bytes() != ca
