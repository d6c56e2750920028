"""The AuthInterceptor guarding the bench's no-op server, keys fetched from tokensvc."""

from __future__ import annotations

from tokensvc_client import AioAuthInterceptor, AsyncJwksCache, AsyncTokenClient


def interceptor(*, issuer: str, audience: str, target: str) -> AioAuthInterceptor:
    client = AsyncTokenClient(target, insecure=True)
    return AioAuthInterceptor(AsyncJwksCache(client.get_keys), issuer=issuer, audience=audience)
