"""Review: a PKCS#11 PIN file that is not UTF-8 text (an operator's mistake: a PIN written
by a tool in another encoding, a binary file named by mistake) is one line and exit 2 at
start-up, like a wrong PIN -- never a traceback, and never the PIN's bytes."""

from __future__ import annotations

from tests.keys.test_pkcs11_failures import _one_line, _pkcs11_flags, _serve


def test_a_pin_file_that_is_not_utf8_is_one_line_exit_2(redis_url, tmp_path, softhsm):
    pin = tmp_path / "latin1-pin"
    pin.write_bytes(b"4711-\xe9t\xe9\n")  # latin-1, not UTF-8
    pin.chmod(0o600)
    done = _serve(redis_url, tmp_path, *_pkcs11_flags(softhsm, **{"--pkcs11-pin-file": str(pin)}))
    line = _one_line(done)
    assert str(pin) in line and "not UTF-8" in line
    assert "4711" not in done.stderr
