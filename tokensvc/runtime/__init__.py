"""Assembling and running the server: start-up checks, the gRPC and HTTP listeners,
background tasks, worker processes and the drain on shutdown.

Owns: ``server`` (the composition root), ``startup``, ``workers``, ``draining``.
May import: api and everything below it.
"""
