# auditrelay task runner. `make help` lists the targets; `make check` is the whole gate.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
GO ?= go
GOBIN := $(shell $(GO) env GOPATH)/bin
PLUGIN := fluent-bit/out_auditrelay.so
PROTOC_GEN_GO_VERSION := v1.36.11
PROTOC_GEN_GO_GRPC_VERSION := v1.6.0

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

.PHONY: install
install: ## Install the Python package (editable, with dev tools), the Kusto parser (npm) and the Go code generators
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	cd tests/kql && npm ci --no-audit --no-fund --silent
	$(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
	$(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)

.PHONY: generate
generate: ## Regenerate every generated file: stubs, property list, docs tables, ARM templates, Helm schema
	PATH="$(GOBIN):$$PATH" PYTHONPATH=sidecar:. $(PYTHON) -m tools.generate

.PHONY: plugin
plugin: $(PLUGIN) ## Build the Fluent Bit output plugin out_auditrelay.so

$(PLUGIN): $(shell find fluent-bit -name '*.go' -o -name go.mod -o -name go.sum -o -name '*.h' | grep -v _test.go)
	cd fluent-bit && CGO_ENABLED=1 $(GO) build -trimpath -buildmode=c-shared -o out_auditrelay.so .

.PHONY: lint
lint: ## Lint and type-check everything (ruff, mypy --strict, import-linter, go vet, gofmt)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy
	PYTHONPATH=sidecar lint-imports
	cd fluent-bit && $(GO) vet ./...
	cd tests/conformance && $(GO) vet ./...
	cd tests/controlplane && $(GO) vet ./etcd ./loadgen
	cd tests/helm/kubecheck && $(GO) vet ./...
	@test -z "$$(gofmt -l fluent-bit tests)" || { gofmt -l fluent-bit tests; echo "gofmt: files above need formatting"; exit 1; }

.PHONY: test
test: $(PLUGIN) helm-tools ## Run every test but the control-plane ones (Go with -race, then pytest)
	cd fluent-bit && CGO_ENABLED=1 $(GO) test -race ./...
	$(PYTHON) -m pytest -m "not controlplane"

.PHONY: helm-tools
helm-tools: ## Build helm (pinned) and kubecheck for the chart tests (cached in tests/helm/.cache)
	$(PYTHON) tests/helm/build.py

.PHONY: helm-test
helm-test: $(PLUGIN) helm-tools ## Chart tests: lint and render every ci/ values file, strict decoding, schema current
	$(PYTHON) -m pytest tests/helm

.PHONY: test-fluent-bit fluent-bit-given
fluent-bit-given:
	@test -n "$(FLUENT_BIT)" || { echo "test-fluent-bit: set FLUENT_BIT=/path/to/fluent-bit (see docs/plugin.md)"; exit 2; }
	@test -x "$(FLUENT_BIT)" || { echo "test-fluent-bit: FLUENT_BIT=$(FLUENT_BIT) is not an executable file"; exit 2; }

test-fluent-bit: fluent-bit-given $(PLUGIN) helm-tools ## Every test that runs a real Fluent Bit: make test-fluent-bit FLUENT_BIT=/path/to/fluent-bit
	FLUENT_BIT="$(abspath $(FLUENT_BIT))" $(PYTHON) -m pytest -m fluent_bit tests/integration tests/helm

.PHONY: controlplane
controlplane: ## Build the test control plane (kube-apiserver & co. from the pinned release; cached)
	$(PYTHON) tests/controlplane/build.py

.PHONY: testdata
testdata: controlplane ## Regenerate tests/data: a real kube-apiserver audit log and its Fluent Bit flushes
	$(PYTHON) tests/data/regenerate.py

.PHONY: demo-attacks
demo-attacks: controlplane $(PLUGIN) ## Record the demo's attack log (sidecar/auditrelay/data/controlplane-attacks.jsonl) on the real control plane
	$(PYTHON) tests/controlplane/record_demo_attacks.py

.PHONY: transcripts
transcripts: controlplane ## Rewrite the `auditrelay audit` transcripts in README.md, docs/audit-logging.md and docs/helm.md
	$(PYTHON) tests/audit/transcripts.py --controlplane

.PHONY: controlplane-test
controlplane-test: controlplane ## Tests against a real kube-apiserver, controller manager and scheduler
	$(PYTHON) -m pytest -m controlplane tests/controlplane

.PHONY: check
check: lint test fuzz-smoke controlplane-test soak-ci ## The whole gate: what CI runs

SOAK_EVENTS ?= 1000000
SOAK_ARGS ?=

.PHONY: soak
soak: $(PLUGIN) controlplane ## Chaos soak: SOAK_EVENTS events of the real control plane's mix under faults (needs root: tmpfs)
	nice -n 10 $(PYTHON) tests/soak/run.py --events $(SOAK_EVENTS) $(SOAK_ARGS)

.PHONY: soak-ci
soak-ci: ## The chaos soak at CI size (60,000 events, every fault kind once, under 3 minutes)
	$(MAKE) --no-print-directory soak SOAK_EVENTS=60000 \
	  SOAK_ARGS="--fault-seconds 3 --outage-seconds 6 --spool-limit 512K --drain-seconds 100 --max-seconds 175 \
	    --max-duplicate-share 0.05"

FUZZ_RUNS ?= 1000000
FUZZ_SECONDS ?= 0
PY_FUZZ_TARGETS := decode filter policy config emulator
GO_FUZZ_TARGETS := FuzzFlush FuzzParseConfig

.PHONY: fuzz
fuzz: ## Fuzz every parser, one target at a time, FUZZ_RUNS inputs each (FUZZ_SECONDS: time limit per target)
	@mkdir -p tests/fuzz/.work
	@for target in $(PY_FUZZ_TARGETS); do \
	  nice -n 10 $(PYTHON) tests/fuzz/run.py $$target --runs $(FUZZ_RUNS) --max-seconds $(FUZZ_SECONDS) 2>tests/fuzz/.work/$$target.log || exit 1; \
	done
	$(MAKE) --no-print-directory fuzz-go

.PHONY: fuzz-go
fuzz-go: ## Fuzz the plugin's Push and Configure handling (go test -fuzz), FUZZ_RUNS inputs each
	@for target in $(GO_FUZZ_TARGETS); do \
	  (cd fluent-bit && nice -n 10 $(GO) test ./internal/plugin -run '^$$' -fuzz "^$$target\$$" -fuzztime $(FUZZ_RUNS)x -timeout 0) || exit 1; \
	done

.PHONY: fuzz-smoke
fuzz-smoke: ## A short fuzz of the plugin's targets (pytest runs the Python targets' smoke)
	$(MAKE) --no-print-directory fuzz-go FUZZ_RUNS=3000

.PHONY: demo
demo: $(PLUGIN) ## Run the main job on the embedded default: emulator + sidecar + plugin, real audit log
	$(PYTHON) -m auditrelay demo

.PHONY: fmt
fmt: ## Format Python and Go sources
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .
	gofmt -w fluent-bit tests

.PHONY: clean
clean: ## Remove build outputs
	rm -f $(PLUGIN) fluent-bit/out_auditrelay.h
