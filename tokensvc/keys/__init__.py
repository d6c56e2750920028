"""The signing key ring and its lifecycle: pending -> active -> retired, scheduled and
emergency rotation, KEK wrapping and rewrap, the JWKS it publishes, and the deployment secrets
(refresh-token MAC). ``keys.lua`` is the atomic rotation step it runs in Redis.

Owns: ``ring``.
May import: store, config, redis, proc, families, errors.
"""
