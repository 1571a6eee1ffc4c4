GO ?= go
BIN := bin

.PHONY: all build test vet fuzz demo bench clean

all: build

build:
	$(GO) build -o $(BIN)/vtpm ./cmd/vtpm
	ln -sf vtpm $(BIN)/swtpm

vet:
	$(GO) vet ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt: files above need formatting"; exit 1; }

# The whole suite: unit, compatibility (swtpm_ioctl, tpm2-tools, real swtpm),
# QEMU guests, crash and tamper tests, then each fuzz target briefly.
test: vet
	$(GO) test -count=1 -timeout 15m ./...
	$(MAKE) fuzz FUZZTIME=15s

FUZZTIME ?= 30s
fuzz:
	./scripts/fuzz.sh $(FUZZTIME)

demo: build
	./scripts/demo.sh

# vtpm and swtpm side by side (same machine, same libtpms); rewrites
# BENCHMARKS.md in under three minutes. BENCHFLAGS="-rtt 1000 …" changes counts.
bench: build
	$(GO) build -o $(BIN)/vtpm-bench ./cmd/vtpm-bench
	$(BIN)/vtpm-bench -vtpm $(BIN)/vtpm -out BENCHMARKS.md $(BENCHFLAGS)

clean:
	rm -rf $(BIN)
