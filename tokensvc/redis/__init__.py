"""Connections to Redis: URL parsing (one Redis, Sentinel, Cluster, TLS), the client
factory, the per-connection timeout watchdog, and the embedded ``redis-server`` for laptops.

Owns: ``connection``, ``watchdog``, ``embedded``.
May import: proc, families, errors.
"""
