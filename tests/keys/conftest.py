"""A real software HSM for the key-backend tests: SoftHSM2 with a fresh token per test
session (its own config and token directory under the session's tmp dir), and settings
that put new signing keys into it.

The module is loaded once per process (PKCS#11 is initialised per process), so the whole
session uses one token; tests tell their keys apart by kid, never by counting objects.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tokensvc.config import Rate, Settings
from tokensvc_client.verifier import b64url_decode

#: settings of the tests that issue until something happens
UNLIMITED = {"rate_issue": Rate(0, 1)}


def kid_of(token: str) -> str:
    """The ``kid`` of a JWT's header."""
    return str(json.loads(b64url_decode(token.split(".")[0]))["kid"])


MODULES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
LABEL = "tokensvc-test"
PIN = "4711-user"


@dataclass
class SoftHsm:
    module: Path
    label: str
    pin_file: Path
    conf: Path
    tokendir: Path

    def token_path(self) -> Path:
        """The directory SoftHSM keeps this token's objects in."""
        (path,) = [p for p in self.tokendir.iterdir() if p.is_dir()]
        return path

    def settings(self, **overrides: Any) -> dict[str, Any]:
        return {
            "pkcs11_module": self.module,
            "pkcs11_token": self.label,
            "pkcs11_pin_file": self.pin_file,
            **overrides,
        }


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    module = next((Path(m) for m in MODULES if Path(m).exists()), None)
    util = shutil.which("softhsm2-util")
    assert module is not None and util, "SoftHSM2 missing: `make tools` installs softhsm2"
    root = tmp_path_factory.mktemp("softhsm")
    tokendir = root / "tokens"
    tokendir.mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokendir}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # read by the module and by subprocesses
    subprocess.run(
        [util, "--init-token", "--free", "--label", LABEL, "--pin", PIN, "--so-pin", "4711-so"],
        check=True,
        capture_output=True,
    )
    pin_file = root / "pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    yield SoftHsm(module, LABEL, pin_file, conf, tokendir)
    if old is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = old


@pytest.fixture
def hsm_settings(
    make_settings: Callable[..., Settings], softhsm: SoftHsm
) -> Callable[..., Settings]:
    """Settings whose new keys are generated in the test token (``key_backend`` pkcs11)."""

    def make(**overrides: Any) -> Settings:
        return make_settings(**softhsm.settings(**{"key_backend": "pkcs11", **overrides}))

    return make


def token_objects(softhsm: SoftHsm, kid: str) -> dict[str, Any]:
    """What the token says about key ``kid``'s objects: {"count": n, attribute: value} of
    its private key (through a pool of its own on the process's module). Read again when a
    running server destroys them meanwhile (the handles just listed turn invalid)."""
    from pkcs11 import Attribute, ObjectClass
    from pkcs11.exceptions import AttributeSensitive, ObjectHandleInvalid

    from tokensvc.keys.token_pool import TokenPool

    pool = TokenPool(softhsm.module, softhsm.label, None, softhsm.pin_file, 1, 5.0)

    def inspect(session: Any) -> dict[str, Any]:
        for _ in range(5):
            try:
                return facts_of(list(session.get_objects({Attribute.ID: kid.encode()})))
            except ObjectHandleInvalid:
                continue  # a server destroyed one while it was read: read what is left
        raise AssertionError(f"the objects of {kid} keep vanishing while read")

    def facts_of(found: list[Any]) -> dict[str, Any]:
        facts: dict[str, Any] = {"count": len(found)}
        for obj in found:
            if obj[Attribute.CLASS] != ObjectClass.PRIVATE_KEY:
                continue
            for name in ("SENSITIVE", "EXTRACTABLE", "ALWAYS_SENSITIVE", "NEVER_EXTRACTABLE"):
                facts[name] = bool(obj[getattr(Attribute, name)])
            try:
                obj[Attribute.VALUE]
                facts["value_readable"] = True
            except AttributeSensitive:
                facts["value_readable"] = False
        return facts

    try:
        return asyncio.run(pool.run(inspect))
    finally:
        pool.close()


def destroy_objects(softhsm: SoftHsm, kid: str) -> int:
    """Destroy key ``kid``'s objects in the token, as an operator could by hand."""
    from pkcs11 import Attribute

    from tokensvc.keys.token_pool import TokenPool

    pool = TokenPool(softhsm.module, softhsm.label, None, softhsm.pin_file, 1, 5.0)

    def destroy(session: Any) -> int:
        found = list(session.get_objects({Attribute.ID: kid.encode()}))
        for obj in found:
            obj.destroy()
        return len(found)

    try:
        return asyncio.run(pool.run(destroy))
    finally:
        pool.close()
