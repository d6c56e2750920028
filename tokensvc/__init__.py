"""tokensvc: the token service of the mesh (server package).

Sub-packages, each named after what it owns; imports run from top to bottom only
(``tests/repo/test_layering.py`` checks it)::

    cli        the command line (serve and the operator commands)
    runtime    server assembly, start-up checks, workers, drain
    api        the gRPC surface: servicer, RPC groups, admission, validation, status table
    observe    audit trail, metrics, tracing, logs       | keys      the key ring
    security   caller policy, TLS material               | http      JWKS/discovery listener
    store      families, revocations, rate limits in Redis (+ Lua)
    config     settings and their checks; the flag table (flags), loading them (env)
    redis      connections, Sentinel/Cluster, watchdog, embedded redis-server
    proc       process ownership, task helpers | families  refresh-token format | errors  roots
    handlers   the one handler wrapper (drain, decoding guard, RPC metrics) and its registrar

The token verifier itself is the client library's (``tokensvc_client.verifier``): the
server's Introspect and every interceptor use the same one.
"""

__version__ = "0.1.0"
