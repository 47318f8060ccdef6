package kms

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/sovradtest"
)

const (
	// readyPoll is how often the test asks /readyz while sovrad starts.
	readyPoll = 20 * time.Millisecond
	// readyWithin bounds a start.
	readyWithin = 90 * time.Second
)

// sovraChecks are sovrad's own readiness checks as /readyz?verbose lists
// them once they pass.
var sovraChecks = []string{"[+]sovra-node-api ok", "[+]sovra-kms ok", "[+]sovra-crds ok"}

// readyzClient asks /readyz without credentials, as a load balancer does.
var readyzClient = &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
	TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, //nolint:gosec // a health probe reads one word
}}

// readyz returns the status and body of path on d's API.
func readyz(d *sovradtest.Daemon, path string) (int, string) {
	resp, err := readyzClient.Get(d.URL() + path)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// healthcheck runs `sovrad healthcheck` with args and env, returning its
// exit code and output.
func healthcheck(t *testing.T, env []string, args ...string) (int, string) {
	t.Helper()
	cmd := exec.Command(testutil.Bin(t, "sovrad"), append([]string{"healthcheck"}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode(), string(out)
	}
	if err != nil {
		t.Fatal(err)
	}
	return 0, string(out)
}

// TestReadyMeansReady: polled from the moment sovrad starts, /readyz first
// answers ok only when the node API accepts TLS and the KMS answers (not
// Unavailable); /readyz?verbose names sovra's checks; systemd hears READY=1
// only then; `sovrad healthcheck` fails before and passes after.
func TestReadyMeansReady(t *testing.T) {
	// A stand-in for systemd's notify socket (Type=notify).
	notifyPath := filepath.Join(t.TempDir(), "notify")
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notifyPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer notify.Close()
	t.Setenv("NOTIFY_SOCKET", notifyPath)

	nodeAddr := "127.0.0.1:" + strconv.Itoa(testutil.FreePort(t))
	dataDir := filepath.Join(t.TempDir(), "data")
	keyFile := filepath.Join(t.TempDir(), "secrets", "master.key")
	d := sovradtest.Launch(t, dataDir, "--master-key-file", keyFile, "--node-listen", nodeAddr, "--controllers", "none")
	probeArgs := []string{"--data-dir", dataDir, "--listen", "127.0.0.1:" + strconv.Itoa(d.Port)}

	// What systemd would hear, and what /readyz said at that moment.
	type heard struct {
		msg    string
		status int
	}
	notified := make(chan heard, 1)
	go func() {
		buf := make([]byte, 256)
		for {
			n, err := notify.Read(buf)
			if err != nil {
				return
			}
			if msg := string(buf[:n]); strings.Contains(msg, "READY=1") {
				status, _ := readyz(d, "/readyz")
				notified <- heard{msg, status}
				return
			}
		}
	}()

	if code, out := healthcheck(t, nil, probeArgs...); code != 1 {
		t.Errorf("sovrad healthcheck while starting: exit %d, want 1\n%s", code, out)
	}

	var sawSovraFailing string
	deadline := d.StartedAt.Add(readyWithin)
	for {
		status, body := readyz(d, "/readyz?verbose")
		if status == http.StatusOK {
			break
		}
		if sawSovraFailing == "" && strings.Contains(body, "[-]sovra-") {
			sawSovraFailing = body
		}
		if time.Now().After(deadline) {
			t.Fatalf("not ready within %s\n%s", readyWithin, d.Tail(30))
		}
		time.Sleep(readyPoll)
	}
	readyAfter := time.Since(d.StartedAt)

	// At once, with no retry: the node API accepts TLS...
	roots := x509.NewCertPool()
	ca, err := os.ReadFile(filepath.Join(dataDir, "node-ca.crt"))
	if err != nil || !roots.AppendCertsFromPEM(ca) {
		t.Fatalf("reading the node CA: %v", err)
	}
	dialer := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 2 * time.Second}, Config: &tls.Config{
		RootCAs: roots, ServerName: "127.0.0.1", NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS12,
	}}
	conn, err := dialer.DialContext(context.Background(), "tcp", nodeAddr)
	if err != nil {
		t.Fatalf("ready, but the node API does not accept TLS: %v", err)
	}
	conn.Close()
	// ...and the KMS answers on it: a node it does not know is denied, not
	// told to retry.
	k := &kmsDaemon{Daemon: d, t: t, KMSAddr: nodeAddr, KeyFile: keyFile, roots: roots}
	if _, err := k.Unseal(context.Background(), "00000000-0000-0000-0000-000000000000", []byte{1}); codeOf(err) != codes.PermissionDenied {
		t.Fatalf("ready, but the KMS answers %v (want PermissionDenied)", err)
	}

	_, verbose := readyz(d, "/readyz?verbose")
	for _, want := range sovraChecks {
		if !strings.Contains(verbose, want) {
			t.Errorf("/readyz?verbose lacks %q:\n%s", want, verbose)
		}
	}

	select {
	case h := <-notified:
		if h.status != http.StatusOK {
			t.Errorf("systemd heard %q while /readyz answered %d", h.msg, h.status)
		}
	case <-time.After(10 * time.Second):
		t.Error("systemd never heard READY=1")
	}

	code, out := healthcheck(t, nil, probeArgs...)
	if code != 0 || !strings.Contains(out, "[+]sovra-kms ok") {
		t.Errorf("sovrad healthcheck when ready: exit %d\n%s", code, out)
	}
	// As in the container image: the settings come from SOVRA_* variables.
	code, out = healthcheck(t, []string{"SOVRA_DATA_DIR=" + dataDir, "SOVRA_LISTEN=0.0.0.0:" + strconv.Itoa(d.Port)})
	if code != 0 {
		t.Errorf("sovrad healthcheck from the environment: exit %d\n%s", code, out)
	}

	t.Logf("ready %s after start; before that /readyz said:\n%s", readyAfter.Round(time.Millisecond), sawSovraFailing)
}

// TestReadyWithoutNodeAPI: with no node API (--node-listen=) and no KMS,
// sovra's checks do not apply and do not hold readiness back.
func TestReadyWithoutNodeAPI(t *testing.T) {
	d := sovradtest.Start(t, filepath.Join(t.TempDir(), "data"), "--node-listen=", "--controllers", "none")
	status, verbose := readyz(d, "/readyz?verbose")
	if status != http.StatusOK {
		t.Fatalf("/readyz: %d\n%s", status, verbose)
	}
	for _, want := range sovraChecks {
		if !strings.Contains(verbose, want) {
			t.Errorf("/readyz?verbose lacks %q:\n%s", want, verbose)
		}
	}
	// sovrad sees itself ready too (and would tell systemd).
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(readyPoll) {
		if b, _ := os.ReadFile(d.Log); bytes.Contains(b, []byte(`"sovrad ready"`)) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no \"sovrad ready\" in the log")
		}
	}
	t.Logf("ready %s after start", d.ReadyAt.Sub(d.StartedAt).Round(time.Millisecond))
}
