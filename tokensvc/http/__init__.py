"""The HTTP listener for sidecars and gateways: JWKS, OIDC discovery and ``/metrics``,
behind an accept gate that bounds connections per client.

Owns: ``listener`` (aiohttp application and server), ``gate`` (connection admission).
May import: store, config, redis, proc, families, errors.
"""
