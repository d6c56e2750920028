# Production image: tokensvc served over TLS from a slim, non-root image.
# Build: docker build -t tokensvc .
# Run:   docker run -p 50051:50051 -v $PWD/secrets:/secrets:ro \
#          -e TOKENSVC_REDIS_URL=rediss://redis:6379/0 -e TOKENSVC_ISSUER=https://tokens.example \
#          -e TOKENSVC_KEK_FILE=/secrets/kek.json \
#          -e TOKENSVC_TLS_CERT=/secrets/tls.crt -e TOKENSVC_TLS_KEY=/secrets/tls.key \
#          -e TOKENSVC_HEALTH_CA=/secrets/ca.crt tokensvc
# The image has no embedded Redis: TOKENSVC_REDIS_URL is required. The health probe connects
# to 127.0.0.1 over TLS, so the server certificate needs an IP SAN 127.0.0.1 (or set
# TOKENSVC_HEALTH_TARGET to a name the certificate carries).

FROM python:3.11-slim AS build
WORKDIR /src
COPY clients/python/ clients/python/
COPY pyproject.toml README.md ./
COPY tokensvc/ tokensvc/
RUN pip wheel --no-cache-dir --wheel-dir /wheels ./clients/python '.[otlp]'

FROM python:3.11-slim
RUN useradd --system --uid 10001 --create-home --home-dir /var/lib/tokensvc tokensvc
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
WORKDIR /var/lib/tokensvc
ENV TOKENSVC_LISTEN=0.0.0.0:50051 \
    TOKENSVC_DATA_DIR=/var/lib/tokensvc \
    PYTHONUNBUFFERED=1
# gRPC; HTTPS JWKS (--http-listen, TOKENSVC_HTTP_LISTEN in deploy/kubernetes/config.env);
# Prometheus metrics (--metrics-listen)
EXPOSE 50051 8443 9464
# The probe speaks gRPC health checking; set TOKENSVC_HEALTH_CA (and _CERT/_KEY for mTLS)
# so it can reach the TLS listener.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["tokensvc", "health", "--target", "127.0.0.1:50051"]
ENTRYPOINT ["tokensvc", "serve"]
