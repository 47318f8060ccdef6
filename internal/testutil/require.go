// Package testutil holds the few helpers that tests across the tree share:
// finding the built binaries and requiring the real peers a test talks to.
package testutil

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
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

// FreePort returns a TCP port on 127.0.0.1 that nothing listens on.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
