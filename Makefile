# sovra: build, run and test. `make help` lists the targets.

VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/sovra-dev/sovra/internal/version.Version=$(VERSION)
# The Kubernetes version the API server and kubectl report (the pinned k8s.io/kubernetes).
K8S_VERSION := v1.32.6
K8S_LDFLAGS := -X k8s.io/component-base/version.gitVersion=$(K8S_VERSION) \
	-X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=32 \
	-X k8s.io/client-go/pkg/version.gitVersion=$(K8S_VERSION) \
	-X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=32
DATA_DIR ?= ./.sovra
# Tags for the tests: tpmsimulator builds the go-tpm-tools reference TPM simulator (cgo).
TEST_TAGS ?= tpmsimulator
# Per-package time limit for `make test`; the end-to-end stories build on a warm cache.
TEST_TIMEOUT ?= 60m
GO ?= go

.PHONY: all build run test bench unit e2e help clean

all: build

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

build: bin/sovrad bin/sovra-agent bin/kubectl bin/clusterctl ## build the daemon, the agent and the test kubectl and clusterctl into bin/

# Go's build cache makes these cheap when nothing changed, so they always run.
.PHONY: bin/sovrad bin/sovra-agent bin/kubectl bin/clusterctl generate
generate: ## extract the Cluster API and Talos provider manifests from the pinned modules (git-ignored, embedded in sovrad)
	$(GO) generate ./daemon/capi/crds

bin/sovrad: generate
	CGO_ENABLED=1 $(GO) build -ldflags "$(LDFLAGS) $(K8S_LDFLAGS)" -o $@ ./daemon/cmd/sovrad

bin/sovra-agent:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w $(LDFLAGS)" -o $@ ./agent/cmd/sovra-agent

bin/kubectl:
	$(GO) build -ldflags "$(K8S_LDFLAGS)" -o $@ ./tests/cmd/kubectl

# clusterctl of the pinned Cluster API, for `clusterctl describe cluster` in the
# stories; it never checks for a newer release (see tests/cmd/clusterctl).
bin/clusterctl:
	$(GO) build -o $@ ./tests/cmd/clusterctl

run: bin/sovrad ## run the daemon on its embedded SQLite default in $(DATA_DIR)
	@echo "sovrad: data in $(DATA_DIR); kubeconfig: $(DATA_DIR)/admin.kubeconfig"
	@echo "        kubectl --kubeconfig $(DATA_DIR)/admin.kubeconfig get namespaces"
	bin/sovrad --data-dir $(DATA_DIR)

test: build ## run every test: units and the end-to-end stories against bin/
	SOVRA_BIN_DIR=$(CURDIR)/bin $(GO) test -tags "$(TEST_TAGS)" -count=1 -timeout $(TEST_TIMEOUT) ./...

bench: build ## run the benchmarks and print their figures
	SOVRA_BIN_DIR=$(CURDIR)/bin $(GO) test -tags "$(TEST_TAGS)" -run '^$$' -bench . -benchtime 1x -timeout $(TEST_TIMEOUT) ./...

clean: ## remove build output (not the data directory)
	rm -rf bin dist

# Shipping. Both targets build OCI images without Docker (go-containerregistry).
.PHONY: extension images

extension: ## build the Talos system extension (linux/amd64 + arm64) into dist/extension/: oci/ and sovra-agent-<arch>.tar
	$(GO) run ./extension/cmd/build-extension --version "$(VERSION)" --out dist/extension

images: bin/sovrad ## build the daemon's container image (host arch, from bin/sovrad) into dist/images/: oci/ and sovrad-<arch>.tar
	$(GO) run ./images/cmd/build-images --version "$(VERSION)" --sovrad bin/sovrad --out dist/images
