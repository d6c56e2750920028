"""The gRPC surface: the servicer and its RPC groups, admission of each call (caller policy
and rate limits), request validation, the status table, and the revocation hub that feeds
``WatchRevocations`` streams.

Owns: ``servicer`` (TokenService, a façade), ``token_rpcs``, ``refresh``, ``sessions``,
``admin`` (RPC groups), ``ports`` (the store protocols they receive), ``minting`` (minting
and verification they share),
``admission`` (who may call, how often), ``validation`` (field limits), ``status`` (errors ->
gRPC status codes), ``decoding`` (undecodable requests), ``revocation_hub``, ``times``,
``reflection`` and ``health`` (gRPC's own services, their streams capped per client).
May import: observe, keys, security, http, store, config, redis,
proc, families, errors and the public modules of ``tokensvc_client``.
"""
