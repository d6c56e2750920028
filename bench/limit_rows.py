"""Rows limit.*: what the machine and the stack can do at best -- ECDSA P-256 sign/verify on
one core, and a no-op grpc.aio unary server under the standard load (the floor every service
row is compared with)."""

from __future__ import annotations

from bench.run import Bench, Target

ROWS = ("limit.ecdsa_sign", "limit.ecdsa_verify", "limit.grpc_noop")
TARGETS: list[Target] = []


def run(b: Bench) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    b.progress("limit.ecdsa_sign / limit.ecdsa_verify (cryptography, one core)")
    key = ec.generate_private_key(ec.SECP256R1())
    message = b"x" * 300  # about the size of a token's signing input
    signature = key.sign(message, ec.ECDSA(hashes.SHA256()))
    public = key.public_key()
    b.record_op("limit.ecdsa_sign", lambda: key.sign(message, ec.ECDSA(hashes.SHA256())), b.n(2000))
    b.record_op(
        "limit.ecdsa_verify",
        lambda: public.verify(signature, message, ec.ECDSA(hashes.SHA256())),
        b.n(2000),
    )

    b.progress("limit.grpc_noop (grpc.aio server, no-op unary; run between every row)")
    b.noop_round()
