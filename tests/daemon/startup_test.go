package daemon_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/sovradtest"
)

// TestStartupErrors: each bad configuration stops sovrad before it starts,
// with exit code 2, a message that says what to fix, every problem at once,
// and nothing on disk changed.
func TestStartupErrors(t *testing.T) {
	t.Run("bad datastore URL", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "data")
		out := mustFail(t, nil, "--data-dir", dir, "--datastore", "mysql://root:hunter2pw@db.internal/sovra")
		wantAll(t, out, `--datastore: unsupported scheme "mysql": use postgres://..., or leave it empty for SQLite`)
		if strings.Contains(out, "hunter2pw") {
			t.Fatal("the error repeats the datastore password")
		}
		assertAbsent(t, dir)
		out = mustFail(t, nil, "--data-dir", dir, "--datastore", "postgres:///nohost")
		wantAll(t, out, "--datastore: the postgres URL has no host")
		assertAbsent(t, dir)
	})

	t.Run("data dir is a file", func(t *testing.T) {
		file := filepath.Join(t.TempDir(), "file")
		os.WriteFile(file, []byte("x"), 0o600)
		out := mustFail(t, nil, "--data-dir", filepath.Join(file, "data"))
		wantAll(t, out, "--data-dir "+filepath.Join(file, "data")+": cannot be created: "+file+" is not a directory")
	})

	t.Run("unwritable data dir", func(t *testing.T) {
		testutil.RequireRoot(t)
		ro := filepath.Join(t.TempDir(), "ro")
		os.Mkdir(ro, 0o700)
		if err := syscall.Mount("tmpfs", ro, "tmpfs", syscall.MS_RDONLY, "size=1m"); err != nil {
			t.Fatalf("mounting a read-only tmpfs: %v", err)
		}
		t.Cleanup(func() { syscall.Unmount(ro, 0) })
		out := mustFail(t, nil, "--data-dir", filepath.Join(ro, "data"))
		wantAll(t, out, "--data-dir "+filepath.Join(ro, "data")+": cannot be created: "+ro+" is not writable")
	})

	t.Run("world-readable key and open data dir", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "data")
		d := sovradtest.Start(t, dir)
		d.Stop()
		os.Chmod(filepath.Join(dir, "sa.key"), 0o644)
		os.Chmod(dir, 0o755)
		before := snapshot(t, dir)
		out := mustFail(t, nil, "--data-dir", dir)
		wantAll(t, out,
			"key file "+filepath.Join(dir, "sa.key")+": mode 0644 is readable by other users: chmod 600",
			"--data-dir "+dir+": mode 0755 lets other users in; it holds private keys: chmod 700")
		if after := snapshot(t, dir); after != before {
			t.Fatalf("a refused start changed the data directory:\nbefore:\n%s\nafter:\n%s", before, after)
		}
	})

	t.Run("every problem at once, from flags and environment", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "data")
		out := mustFail(t, []string{"SOVRA_LOG_LEVEL=loud", "SOVRA_OIDC_ISSUER_URL=http://idp.example"},
			"--data-dir", dir, "--listen", "localhost:6443", "--datastore", "ftp://x", "--tls-san", "bad name!")
		wantAll(t, out,
			`--listen "localhost:6443": "localhost" is not an IP address`,
			`--datastore: unsupported scheme "ftp"`,
			`--tls-san "bad name!": neither an IP address nor a DNS name`,
			// Values from the environment are named by their variables.
			`SOVRA_LOG_LEVEL "loud": use debug, info, warn or error`,
			`SOVRA_OIDC_ISSUER_URL "http://idp.example": must be an https URL`,
			`--oidc-client-id: required with SOVRA_OIDC_ISSUER_URL`)
		assertAbsent(t, dir)
		out = mustFail(t, []string{"SOVRA_SHUTDOWN_TIMEOUT=soon"}, "--data-dir", dir)
		wantAll(t, out, `SOVRA_SHUTDOWN_TIMEOUT: invalid argument "soon"`)
	})
}

// mustFail runs sovrad, expects exit code 2 within seconds, and returns its stderr.
func mustFail(t *testing.T, env []string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, testutil.Bin(t, "sovrad"), args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 2 {
		t.Fatalf("sovrad %v: want exit code 2, got %v\n%s", args, err, out)
	}
	return string(out)
}

func wantAll(t *testing.T, out string, parts ...string) {
	t.Helper()
	for _, p := range parts {
		if !strings.Contains(out, p) {
			t.Errorf("output lacks %q:\n%s", p, out)
		}
	}
}

func assertAbsent(t *testing.T, path string) {
	t.Helper()
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a refused start created %s", path)
	}
}

// snapshot lists every file under dir with its mode, size and modification time.
func snapshot(t *testing.T, dir string) string {
	t.Helper()
	var lines []string
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		lines = append(lines, fmt.Sprintf("%s %v %d %d", p, fi.Mode(), fi.Size(), fi.ModTime().UnixNano()))
		return nil
	})
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// TestDatastoreTimeout: a PostgreSQL datastore that does not answer is
// waited for, saying so, for --datastore-timeout and no longer; then sovrad
// exits 1 naming the server and the setting, and has written nothing: the
// data directory does not exist. The password is never repeated.
func TestDatastoreTimeout(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	dsn := "postgres://sovra:hunter2pw@127.0.0.1:" + strconv.Itoa(testutil.FreePort(t)) + "/sovra"
	start := time.Now()
	code, _, errOut := sovrad(t, []string{"SOVRA_DATASTORE_TIMEOUT=3s"}, nil,
		"--data-dir", dir, "--datastore", dsn, "--listen", "127.0.0.1:"+strconv.Itoa(testutil.FreePort(t)), "--node-listen=")
	took := time.Since(start)
	if code != 1 {
		t.Fatalf("exit %d, want 1:\n%s", code, errOut)
	}
	wantAll(t, errOut,
		`"msg":"waiting for the datastore: nothing is written until it answers","server":"127.0.0.1:`,
		`did not answer within 3s (SOVRA_DATASTORE_TIMEOUT; last error: `,
		"nothing was written; check that it runs and is reachable, or raise SOVRA_DATASTORE_TIMEOUT")
	if strings.Contains(errOut, "hunter2pw") {
		t.Fatalf("the log repeats the datastore password:\n%s", errOut)
	}
	if took < 3*time.Second || took > 15*time.Second {
		t.Fatalf("sovrad gave up after %s, want about 3s", took)
	}
	assertAbsent(t, dir)
}

// TestQuietStart: at the default log level a start with every controller
// writes sovrad's own lines and the libraries' warnings, not the hundreds of
// info lines the API server and Cluster API write while they start, so the
// one warning that matters here (no EK policy) stands out.
func TestQuietStart(t *testing.T) {
	d := sovradtest.Start(t, filepath.Join(t.TempDir(), "data"))
	// The controllers start after the API is ready: wait for them.
	for deadline := time.Now().Add(90 * time.Second); !strings.Contains(d.LogSince(0), `"msg":"elected: running controllers"`); {
		if time.Now().After(deadline) {
			t.Fatalf("the controllers did not start:\n%s", d.Tail(20))
		}
		time.Sleep(time.Second)
	}
	time.Sleep(5 * time.Second)
	levels := map[string]int{}
	var libraryInfo []string
	for _, line := range strings.Split(strings.TrimSpace(d.LogSince(0)), "\n") {
		var entry struct{ Level, Logger, Msg string }
		if err := json.Unmarshal([]byte(line), &entry); err != nil {
			t.Fatalf("a log line is not JSON: %q", line)
		}
		levels[entry.Level]++
		if entry.Level == "info" && (entry.Logger == "k8s" || strings.HasPrefix(entry.Logger, "capi.controller-runtime")) {
			libraryInfo = append(libraryInfo, entry.Logger+": "+entry.Msg)
		}
	}
	t.Logf("log lines by level: %v", levels)
	if len(libraryInfo) > 0 {
		t.Errorf("%d info lines of libraries, e.g. %q", len(libraryInfo), libraryInfo[0])
	}
	if levels["info"] > maxStartInfoLines {
		t.Errorf("%d info lines at start, want at most %d:\n%s", levels["info"], maxStartInfoLines, d.Tail(60))
	}
	wantAll(t, d.LogSince(0), `"level":"warn"`, "no EK policy configured (--ek-roots, --ek-allow-list): every enrollment will be refused")
}

// maxStartInfoLines bounds the info lines of a start (about 15 today; 217
// before the libraries' info lines were dropped).
const maxStartInfoLines = 50
