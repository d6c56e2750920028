"""Securing the service itself: the caller policy (who may call which RPC) and
the TLS material (server certificate, client CA, reloading on change).

Owns: ``policy``, ``tls``.
May import: store, config, redis, proc, families, errors.
"""
