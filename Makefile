# meshkeeper — see README.md. Every tool is built from a pinned Go module.
SHELL := /usr/bin/env bash -o pipefail
.SHELLFLAGS := -ec

BIN            ?= $(CURDIR)/bin
CONTROLLER_GEN := $(BIN)/controller-gen
GOLANGCI_LINT  := $(BIN)/golangci-lint
CLUSTER_BINS   := $(BIN)/cluster
PROMETHEUS     := $(BIN)/prometheus
# Mesh objects the e2e suite captures at each stage for the Argo CD health test.
ARGOCD_FIXTURES ?= $(CURDIR)/.tmp/argocd-fixtures
IMG            ?= ghcr.io/meshkeeper/manager:dev
AGENT_IMG      ?= ghcr.io/meshkeeper/agent:dev
GO_TEST_FLAGS  ?=

export KUBEBUILDER_ASSETS ?= $(CLUSTER_BINS)

.PHONY: all
all: build

##@ Development

.PHONY: manifests
manifests: $(CONTROLLER_GEN) ## Generate CRDs and RBAC from the API types and markers (and copy them and the rollout alerts into charts/meshkeeper).
	$(CONTROLLER_GEN) crd paths=./api/... output:crd:artifacts:config=config/crd/bases
	$(CONTROLLER_GEN) rbac:roleName=meshkeeper-manager paths="./internal/controller/...;./webhooks/..." output:rbac:artifacts:config=config/rbac
	cp config/crd/bases/*.yaml charts/meshkeeper/crds/
	cp config/rbac/role.yaml charts/meshkeeper/files/role.yaml
	cp config/prometheus/meshkeeper-rules.yaml charts/meshkeeper/files/meshkeeper-rules.yaml
	@# The Gateway API's standard-channel CRDs of the version go.mod pins, as its module ships them.
	rm -f bundles/gateway-api/*.yaml
	gwapi="$$(go list -m -f '{{.Dir}}' sigs.k8s.io/gateway-api)" && \
		for f in "$$gwapi"/config/crd/standard/gateway.networking.k8s.io_*.yaml; do \
			case "$$f" in *_vap_*) continue;; esac; install -m 0644 "$$f" bundles/gateway-api/; done

.PHONY: generate
generate: $(CONTROLLER_GEN) generate-bpf ## Generate deepcopy code and the bpf2go output.
	$(CONTROLLER_GEN) object:headerFile=hack/boilerplate.go.txt paths=./api/...

.PHONY: generate-bpf
generate-bpf: ## Compile bpf/*.c with the pinned clang-14 (apt: clang-14 llvm-14) and regenerate the bpf2go bindings.
	@command -v clang-14 >/dev/null || { echo "clang-14 is needed to regenerate bpf/: apt-get install clang-14 llvm-14"; exit 1; }
	cd bpf && go generate ./...

.PHONY: fmt
fmt: ## go fmt.
	go fmt ./...

.PHONY: vet
vet: ## go vet.
	go vet ./...

.PHONY: lint
lint: $(GOLANGCI_LINT) ## golangci-lint with .golangci.yml.
	$(GOLANGCI_LINT) run ./...

.PHONY: verify
verify: manifests generate ## Fail if generated files are stale or code is unformatted.
	@test -z "$$(gofmt -l api cmd internal webhooks test)" || { echo "gofmt needed:"; gofmt -l api cmd internal webhooks test; exit 1; }
	@git diff --exit-code -- config api bpf charts bundles/gateway-api || { echo "Generated files are stale: run 'make manifests generate' and commit."; exit 1; }
	@test -z "$$(git ls-files --others --exclude-standard -- config api bpf charts bundles/gateway-api)" || { echo "Untracked generated files:"; git ls-files --others --exclude-standard -- config api bpf charts bundles/gateway-api; exit 1; }
	go mod tidy -diff
	cd test/argocd && go mod tidy -diff
	cd tools/prometheus && go mod tidy -diff
	cd tools/istiod && go mod tidy -diff

# make test builds every part a test needs (cluster binaries, Prometheus), so
# a test that finds one missing fails instead of skipping. Only the
# privileged tests still skip when not root (CI sets MESHKEEPER_REQUIRE_PRIVILEGED=1).
test test-unit test-e2e: export MESHKEEPER_REQUIRE_CLUSTER ?= 1

.PHONY: test
test: cluster-bins node-bins spire-bins prometheus istiod vet test-unit test-e2e ## Unit, integration (envtest), e2e and Argo CD health tests.
	$(MAKE) test-argocd MESHKEEPER_ARGOCD_FIXTURES=$(ARGOCD_FIXTURES)

.PHONY: test-unit
test-unit: cluster-bins node-bins spire-bins prometheus istiod ## Unit and integration tests (envtest against the real API server).
	@# The controller package alone runs ~9-10 min on 2 cores (real API server,
	@# Prometheus, SPIRE); go test's default 10 min timeout killed it in CI.
	go test $(GO_TEST_FLAGS) -timeout 30m $$(go list ./... | grep -v /test/e2e)

.PHONY: test-e2e
test-e2e: cluster-bins node-bins prometheus build ## End-to-end: the manager binary against a local cluster with kwok nodes and a real node.
	rm -rf $(ARGOCD_FIXTURES)
	MESHKEEPER_MANAGER_BIN=$(BIN)/manager MESHKEEPER_AGENT_BIN=$(BIN)/agent MESHKEEPER_ARGOCD_FIXTURES=$(ARGOCD_FIXTURES) \
		go test $(GO_TEST_FLAGS) -timeout 20m ./test/e2e/... -args -ginkgo.v

.PHONY: test-argocd
test-argocd: ## Argo CD's own Lua engine on config/argocd/health.lua (its own module: test/argocd), on the committed fixtures and $$MESHKEEPER_ARGOCD_FIXTURES.
	cd test/argocd && go test $(GO_TEST_FLAGS) -count=1 ./...

.PHONY: fuzz
fuzz: ## Fuzz the Mesh validation for 60s.
	go test ./webhooks/ -run '^$$' -fuzz FuzzValidateMesh -fuzztime 60s

.PHONY: bench
bench: cluster-bins bench-datapath ## All Go benchmarks, after bench-datapath (envtest suites start a cluster).
	go test -run '^$$' -bench . -benchmem ./webhooks/ ./internal/...

.PHONY: bench-datapath
bench-datapath: ## As root: conns/s and latency direct vs eBPF vs iptables REDIRECT, agent RSS with 250 netns; prints a markdown table.
	@mkdir -p .tmp
	MESHKEEPER_REQUIRE_PRIVILEGED=1 go test -run '^$$' -bench 'Connect|AgentRSS' -benchtime 2000x -benchmem -count 1 -timeout 10m ./internal/agent/ \
		| tee .tmp/bench-datapath.txt | hack/benchtable.sh
	@echo "(raw results: .tmp/bench-datapath.txt)"

.PHONY: bench-scale
bench-scale: cluster-bins ## A kwok scale run (500 nodes, 5,000 namespaces, 5,000 pods; MESHKEEPER_SCALE_NODES/_NAMESPACES/_PODS override): install, canary upgrade, CPU, RSS, API requests at rest, reconcile p99; prints a markdown table and the profile's top meshkeeper entries.
	@mkdir -p .tmp
	MESHKEEPER_SCALE=1 MESHKEEPER_REQUIRE_CLUSTER=1 go test -count=1 -timeout 60m -v -run '^TestScale$$' ./test/scale/ | tee .tmp/bench-scale.log
	@echo; cat .tmp/bench-scale.md
	@echo; echo "CPU profile of install + upgrade (.tmp/scale-cpu.pprof), meshkeeper's own code by cumulative time (go tool pprof -top -cum):"
	go tool pprof -top -cum -show 'meshkeeper/meshkeeper' .tmp/scale-cpu.pprof 2>/dev/null | awk 'NR<=5 || (/meshkeeper\/meshkeeper/ && n++ < 12)'

##@ Build

.PHONY: build
build: ## Build the manager and agent binaries.
	go build -o $(BIN)/manager ./cmd/manager
	go build -o $(BIN)/agent ./cmd/agent
	go build -o $(BIN)/kubectl-meshkeeper ./cmd/kubectl-meshkeeper

.PHONY: docker-build
docker-build: ## Build the manager and agent images (needs a Docker engine).
	docker build -t $(IMG) -f Dockerfile .
	docker build -t $(AGENT_IMG) -f Dockerfile.agent .

.PHONY: demo
demo: cluster-bins prometheus build ## Start a local cluster, run the operator, apply the sample Mesh, watch it become Ready.
	go run ./test/demo --manager $(BIN)/manager --cluster-bins $(CLUSTER_BINS)

##@ Deployment

.PHONY: deploy
deploy: ## Install CRDs, RBAC, webhook and the manager into the current kubectl context.
	cd config/manager && kubectl kustomize . >/dev/null
	kubectl apply -k config/default

.PHONY: undeploy
undeploy: ## Remove what deploy installed (Meshes are deleted first so their finalizers run).
	-kubectl delete mesh --all --wait --timeout=5m
	@# Everything but the components' namespace (istio-system): it may hold
	@# objects meshkeeper does not own, so it is left for you to delete.
	kubectl kustomize config/default | kubectl delete --ignore-not-found -f - --selector 'meshkeeper.dev/keep-on-undeploy!=true'

##@ Tools

.PHONY: prometheus
prometheus: ## Build (once, cached) the Prometheus server from the pinned module in tools/prometheus.
	hack/prometheus.sh >/dev/null

.PHONY: cluster-bins
cluster-bins: ## Build (once, cached) etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok.
	hack/cluster-bins.sh >/dev/null

.PHONY: node-bins
node-bins: ## Build (once, cached) kubelet, kube-proxy, containerd, ctr and the runc shim for the real test node.
	hack/node-bins.sh >/dev/null

.PHONY: spire-bins
spire-bins: ## Build (once, cached) spire-server and spire-agent v1.13.3 for the identity tests.
	hack/spire-bins.sh >/dev/null

.PHONY: istiod
istiod: ## Build (once, cached) pilot-discovery (istiod) from the pinned istio.io/istio in tools/istiod, for the tests that run a real istiod.
	hack/istiod.sh >/dev/null

.PHONY: registry
registry: ## Build (once, cached) CNCF distribution's OCI registry for the catalog tests.
	hack/registry.sh >/dev/null

# The OCI catalog tests (internal/bundle/oci, internal/controller) publish to a real registry.
test-unit: registry

$(CONTROLLER_GEN): tools/codegen/go.mod tools/codegen/go.sum
	cd tools/codegen && go build -o $(CONTROLLER_GEN) sigs.k8s.io/controller-tools/cmd/controller-gen

$(GOLANGCI_LINT): tools/lint/go.mod tools/lint/go.sum
	cd tools/lint && go build -o $(GOLANGCI_LINT) github.com/golangci/golangci-lint/v2/cmd/golangci-lint

.PHONY: help
help: ## Show targets.
	@awk 'BEGIN {FS = ":.*##"} /^[a-zA-Z_-]+:.*?##/ { printf "  %-14s %s\n", $$1, $$2 } /^##@/ { printf "\n%s\n", substr($$0, 5) }' $(MAKEFILE_LIST)
