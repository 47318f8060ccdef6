// Package testutil holds the few helpers that tests across the tree share:
// finding the built binaries and requiring the real peers a test talks to.
package testutil

import (
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"testing"
)

// InCI reports whether the tests run under CI, where every real peer is
// installed by .ci/run: there a missing peer fails the test instead of
// skipping it, so a green CI always means the stories ran.
func InCI() bool { return os.Getenv("CI") != "" }

// Require skips the test (fails it under CI) when a command is not on PATH.
func Require(t testing.TB, commands ...string) {
	t.Helper()
	for _, c := range commands {
		if _, err := exec.LookPath(c); err != nil {
			missing(t, c+" is not installed")
		}
	}
}

// RequireRoot skips the test (fails it under CI) unless it runs as root, as
// tests that create network namespaces must.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		missing(t, "the test needs root")
	}
}

func missing(t testing.TB, why string) {
	t.Helper()
	if InCI() {
		t.Fatalf("%s (CI installs every peer: see .ci/run)", why)
	}
	t.Skip(why)
}

// Bin returns the path of a binary built by `make build`: from $SOVRA_BIN_DIR
// when set, else from bin/ at the repository root. It fails the test when the
// binary is missing, with the command that builds it.
func Bin(t testing.TB, name string) string {
	t.Helper()
	dir := os.Getenv("SOVRA_BIN_DIR")
	if dir == "" {
		dir = filepath.Join(RepoRoot(t), "bin")
	}
	p := filepath.Join(dir, name)
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("%s not built: run `make build` first (%v)", p, err)
	}
	return p
}

// RepoRoot returns the repository root, found from this file's location.
func RepoRoot(t testing.TB) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("cannot locate the repository root")
	}
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// Ports FreePort picks from: below Linux's ephemeral range (32768-60999),
// which the kernel hands to outgoing connections and to port 0 listeners.
// A port picked there could be taken by any connection of any test before
// the daemon binds it ("address already in use").
const (
	freePortMin = 20000
	freePortMax = 32768
)

// FreePort returns a TCP port on 127.0.0.1 that nothing listens on (FreePortOn).
func FreePort(t testing.TB) int {
	t.Helper()
	return FreePortOn(t, "127.0.0.1")
}

// FreePortOn returns a TCP port on host that nothing listens on, picked at
// random outside the ephemeral range so that no outgoing connection takes
// it before the caller binds it.
func FreePortOn(t testing.TB, host string) int {
	t.Helper()
	for range 1000 {
		port := freePortMin + rand.IntN(freePortMax-freePortMin) //nolint:gosec // not a secret
		l, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(port)))
		if err != nil {
			continue
		}
		l.Close()
		return port
	}
	t.Fatalf("no free port between %d and %d on %s", freePortMin, freePortMax, host)
	return 0
}
