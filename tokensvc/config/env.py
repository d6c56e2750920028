"""Loading the settings: defaults, then ``TOKENSVC_*`` environment, then parsed flags,
merged and validated into one :class:`~tokensvc.config.Settings`.

A bad value raises :class:`~tokensvc.errors.ConfigError` whose message is the one line the
CLI prints; so does a boolean variable spelled neither true nor false. The names and types
read are those of the flag table (:mod:`tokensvc.config.flags`).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from tokensvc.config import Rate, Settings
from tokensvc.config.flags import FLAGS, OPTIONS, add_arguments
from tokensvc.errors import ConfigError

__all__ = ["env_flag", "load", "parse_args", "unknown_variables"]

_TRUE = frozenset({"1", "true", "yes", "on", "y"})
_FALSE = frozenset({"0", "false", "no", "off", "n", ""})


def env_flag(name: str, raw: str | None) -> bool:
    """A boolean from the environment: 1/true/yes/on (true), 0/false/no/off or unset (false),
    in any case.

    Raises:
        ConfigError: any other spelling (``TOKENSVC_INSECURE=maybe`` is not silently false).
    """
    value = (raw or "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean: use 1/0, true/false, yes/no or on/off")


#: ``TOKENSVC_*`` variables that are not ``serve`` settings: the CLI's transport and its
#: container probes (``TOKENSVC_HEALTH_*``), the test suite's (``TOKENSVC_TEST_*``), and what
#: Kubernetes injects for a Service named ``tokensvc`` (``TOKENSVC_SERVICE_*``,
#: ``TOKENSVC_PORT``, ``TOKENSVC_PORT_*``).
_OTHER_VARIABLES = re.compile(
    r"TOKENSVC_(TARGET|CA|CERT|KEY|HEALTH_\w+|TEST_\w+|SERVICE_\w+|PORT|PORT_\w+)"
)


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """``TOKENSVC_*`` names in ``env`` that nothing reads (a typo such as
    ``TOKENSVC_REDIS_UTL`` would otherwise be silently ignored)."""
    known = {"TOKENSVC_" + name.upper() for name in (*OPTIONS, *FLAGS)}
    return sorted(
        name
        for name in env
        if name.startswith("TOKENSVC_")
        and name not in known
        and not _OTHER_VARIABLES.fullmatch(name)
    )


def load(args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Merge defaults, environment and parsed flags, then validate.

    Raises:
        ConfigError: on any unparsable or invalid value.
    """
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    for name, (_text, kind) in OPTIONS.items():
        raw = getattr(args, name, None) if args is not None else None
        if raw is None:
            raw = env.get("TOKENSVC_" + name.upper())
        if raw is None or raw == "":
            continue
        try:
            values[name] = _convert(name, str(raw), kind)
        except ValueError:
            raise ConfigError(f"--{name.replace('_', '-')}: cannot parse {raw!r}") from None
    for name in FLAGS:
        flag = getattr(args, name, None) if args is not None else None
        if flag is None:
            variable = "TOKENSVC_" + name.upper()
            flag = env_flag(variable, env.get(variable))
        values[name] = bool(flag)
    if "workers" not in values:
        values["workers"] = _default_workers(values)
    return Settings(**values).validate()  # type: ignore[arg-type]


def _default_workers(values: Mapping[str, object]) -> int:
    """Production (TLS) uses every core of the host; development mode, and a listener on
    port 0 (whose port the workers could not share), one process."""
    listen = str(values.get("listen", Settings().listen))
    if values.get("insecure") or listen.endswith(":0"):
        return 1
    return max(1, min(os.cpu_count() or 1, 256))


def _convert(name: str, raw: str, kind: type) -> object:
    if name == "audience":
        return tuple(a.strip() for a in raw.split(",") if a.strip())
    if kind is Path:
        return Path(raw).expanduser()
    if kind is Rate:
        return Rate.parse(raw)
    if name == "log_level" and raw.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(raw)
    return kind(raw.upper() if name == "log_level" else raw)


def parse_args(argv: Sequence[str]) -> Settings:
    """Parse ``serve`` flags (used by tests and the CLI)."""
    parser = argparse.ArgumentParser(prog="tokensvc serve")
    add_arguments(parser)
    return load(parser.parse_args(list(argv)))
