"""Method names, as the interceptors and the decision need them.

:func:`method_key` and :class:`MethodFilter` say which methods a configuration entry (an
exempt entry, a step-up key) names: a full method name or a prefix ending in "/". What the
interceptors share about method handlers themselves is :mod:`tokensvc_client.handlers`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: A full method name ("/pkg.Service/Method"), or a prefix: one service ("/pkg.Service/")
#: or every method ("/").
_FULL_METHOD = re.compile(r"/[^/\s]+/[^/\s]+")
_METHOD_PREFIX = re.compile(r"/(?:[^/\s]+/)?")


def method_key(key: object, what: str) -> str:
    """``key`` if it is a full method name or a prefix ending in "/", else ValueError.

    A key like ``"/shop.Admin"`` (neither) would silently match nothing: a mistake that
    protects or exempts nothing must fail where the interceptor is built.

    Raises:
        ValueError: naming the key and ``what`` it is (e.g. "step_up key").
    """
    if not isinstance(key, str) or not (
        _FULL_METHOD.fullmatch(key) or _METHOD_PREFIX.fullmatch(key)
    ):
        raise ValueError(
            f"{what} {key!r} is neither a full method name '/pkg.Service/Method' nor a "
            "prefix ending in '/' ('/pkg.Service/')"
        )
    return key


class MethodFilter:
    """A set of full method names ("/pkg.Service/Method") and prefixes.

    An entry ending in "/" is a prefix ("/grpc.health.v1.Health/" covers every method of
    that service); any other entry matches only exactly, so exempting "/pkg.Svc/Get"
    never exempts "/pkg.Svc/GetSecret". Anything else is refused (:func:`method_key`).
    """

    def __init__(self, entries: Iterable[str]) -> None:
        if isinstance(entries, str):
            raise TypeError("pass a collection of method names, not one string")
        entries = tuple(method_key(e, "exempt entry") for e in entries)
        self._exact = frozenset(e for e in entries if not e.endswith("/"))
        self._prefixes = tuple(e for e in entries if e.endswith("/"))

    def __contains__(self, method: object) -> bool:
        return isinstance(method, str) and (
            method in self._exact or method.startswith(self._prefixes)
        )
