"""The ``tokensvc`` command line: ``serve`` and every operator command.

Owns: ``main`` (the entry point and ``serve``), ``admin`` (commands that call a server),
``transport`` (the shared TLS/plaintext flags), ``output`` (tables and ``--output json``),
``devcerts`` (the development PKI of ``tokensvc certs``).
May import: every other package (it is the top floor).
"""
