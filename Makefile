GO ?= go
BIN := bin

.PHONY: all build test vet fuzz demo bench clean install uninstall proto

PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
UNITDIR ?= /etc/systemd/system

all: build

build:
	$(GO) build -o $(BIN)/vtpm ./cmd/vtpm
	ln -sf vtpm $(BIN)/swtpm
	$(GO) build -o $(BIN)/vtpm-hostd ./cmd/vtpm-hostd
	$(GO) build -o $(BIN)/vtpm-keyservice ./cmd/vtpm-keyservice

# The API's generated code (committed) from api/**/*.proto: protoc from
# Debian's protobuf-compiler, its Go plugins at pinned versions.
PROTOC_GEN_GO := google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
PROTOC_GEN_CONNECT_GO := connectrpc.com/connect/cmd/protoc-gen-connect-go@v1.21.1
proto:
	GOBIN=$(abspath $(BIN)) $(GO) install $(PROTOC_GEN_GO)
	GOBIN=$(abspath $(BIN)) $(GO) install $(PROTOC_GEN_CONNECT_GO)
	cd api && protoc -I . \
		--plugin=protoc-gen-go=$(abspath $(BIN))/protoc-gen-go --go_out=. --go_opt=paths=source_relative \
		--plugin=protoc-gen-connect-go=$(abspath $(BIN))/protoc-gen-connect-go --connect-go_out=. --connect-go_opt=paths=source_relative \
		$$(find . -name '*.proto' | sort)

vet:
	$(GO) vet ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt: files above need formatting"; exit 1; }

# The whole suite: unit, compatibility (swtpm_ioctl, tpm2-tools, real swtpm),
# QEMU guests, crash and tamper tests, then each fuzz target briefly.
test: vet
	$(GO) test -count=1 -timeout 30m ./...
	$(MAKE) fuzz FUZZTIME=15s

FUZZTIME ?= 30s
fuzz:
	./scripts/fuzz.sh $(FUZZTIME)

demo: build
	./scripts/demo.sh

# vtpm and swtpm side by side (same machine, same libtpms); rewrites
# BENCHMARKS.md in about four minutes. BENCHFLAGS="-rtt 1000 …" changes counts.
bench: build
	$(GO) build -o $(BIN)/vtpm-bench ./cmd/vtpm-bench
	$(BIN)/vtpm-bench -vtpm $(BIN)/vtpm -out BENCHMARKS.md $(BENCHFLAGS)

clean:
	rm -rf $(BIN)

# vtpm in BINDIR with swtpm and swtpm_setup beside it (/usr/local/bin comes
# before /usr/bin in libvirtd's PATH, so libvirt runs vtpm), vtpm-hostd (the
# host service, which vtpm finds beside itself), and the host service's
# socket-activated units. README: "libvirt hosts".
install: build
	install -D -m 0755 $(BIN)/vtpm $(DESTDIR)$(BINDIR)/vtpm
	install -D -m 0755 $(BIN)/vtpm-hostd $(DESTDIR)$(BINDIR)/vtpm-hostd
	install -D -m 0755 $(BIN)/vtpm-keyservice $(DESTDIR)$(BINDIR)/vtpm-keyservice
	ln -sf vtpm $(DESTDIR)$(BINDIR)/swtpm
	ln -sf vtpm $(DESTDIR)$(BINDIR)/swtpm_setup
	install -D -m 0644 dist/systemd/vtpm-host.socket $(DESTDIR)$(UNITDIR)/vtpm-host.socket
	sed 's|@BINDIR@|$(BINDIR)|g' dist/systemd/vtpm-host.service > $(BIN)/vtpm-host.service
	install -D -m 0644 $(BIN)/vtpm-host.service $(DESTDIR)$(UNITDIR)/vtpm-host.service
	@if [ -z "$(DESTDIR)" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then \
		systemctl daemon-reload && systemctl enable --now vtpm-host.socket; fi

uninstall:
	@if [ -z "$(DESTDIR)" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then \
		systemctl disable --now vtpm-host.socket vtpm-host.service || true; fi
	rm -f $(DESTDIR)$(UNITDIR)/vtpm-host.socket $(DESTDIR)$(UNITDIR)/vtpm-host.service
	@for l in swtpm swtpm_setup; do \
		if [ "$$(readlink $(DESTDIR)$(BINDIR)/$$l)" = vtpm ]; then rm -f $(DESTDIR)$(BINDIR)/$$l; fi; done
	rm -f $(DESTDIR)$(BINDIR)/vtpm $(DESTDIR)$(BINDIR)/vtpm-hostd $(DESTDIR)$(BINDIR)/vtpm-keyservice
	@if [ -z "$(DESTDIR)" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
