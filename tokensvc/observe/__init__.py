"""Observability: the audit trail, metrics (OpenTelemetry API, Prometheus and OTLP),
tracing set-up and the JSON logs.

Owns: ``audit`` (records: building, redaction, log lines), ``audit_writer`` (their batched
writes to the Redis streams), ``audit_tail`` (reading them back), ``metrics`` (instruments and
gauges the alert rules read), ``rpc_metrics`` (RPC duration per method and status),
``tracing``, ``quiet_spans``, ``logs``.
May import: store, config, redis, proc, families, errors.
"""
