"""The signing key ring and its lifecycle: pending -> active -> retired, scheduled and
emergency rotation, KEK wrapping and rewrap, the JWKS it publishes, and the deployment secrets
(refresh-token MAC). ``keys.lua`` is the atomic rotation step it runs in Redis.

Owns: ``ring`` (the KeyRing: signing, the KEK file), ``ring_state`` (the ring's records,
its reads and the deployment secrets), ``rotation`` (the lifecycle), ``backend`` (the
private-key interface), ``local`` (keys under the KEK), ``pkcs11`` and ``token_pool`` (keys
in a PKCS#11 token; python-pkcs11 is imported only with ``--pkcs11-module``).
May import: store, config, redis, proc, families, errors.
"""
