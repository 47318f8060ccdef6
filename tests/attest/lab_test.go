package attest

import (
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"

	agentattest "github.com/sovra-dev/sovra/agent/attest"
	"github.com/sovra-dev/sovra/agent/tpm/swtpm"
	"github.com/sovra-dev/sovra/internal/attest"
	"github.com/sovra-dev/sovra/internal/testutil"
)

// lab provides the TPMs of a story: TPM 0 is the node under test, TPM 1 is
// another machine (an attacker's, or a second node).
type lab interface {
	// use makes TPM i current, booting it when it was off, and returns it
	// with the path of its event log. Only the current TPM may be used.
	use(t *testing.T, i int) (agentattest.TPM, string)
	// ekPolicy is the daemon's EK policy: it admits TPM 0 and not TPM 1.
	ekPolicy(t *testing.T) attest.EKPolicy
	// ekCertificates reports whether the lab's TPMs hold EK certificates.
	ekCertificates() bool
	// restore makes TPM 0 current again and reports whether that rebooted
	// it into a state where its AKs no longer load (then the node re-enrolls).
	restore(t *testing.T) bool
}

func extend(t testing.TB, rw io.ReadWriter, pcr int, digest []byte) {
	t.Helper()
	if err := tpm2.PCRExtend(rw, tpmutil.Handle(pcr), tpm2.AlgSHA256, digest, ""); err != nil {
		t.Fatalf("extending PCR %d: %v", pcr, err)
	}
}

// swtpmLab runs two swtpm instances in socket mode, each manufactured by
// swtpm_setup with an EK certificate from one local CA.
type swtpmLab struct {
	ca    string // directory of the local CA
	tpms  [2]swtpm.TCP
	logs  [2]string
	roots string
}

func newSwtpmLab(t *testing.T) *swtpmLab {
	testutil.Require(t, "swtpm", "swtpm_setup", "swtpm_localca")
	dir := t.TempDir()
	l := &swtpmLab{ca: filepath.Join(dir, "ca")}
	if err := os.MkdirAll(l.ca, 0o700); err != nil {
		t.Fatal(err)
	}
	caConf := filepath.Join(dir, "localca.conf")
	writeFile(t, caConf, fmt.Sprintf("statedir = %[1]s\nsigningkey = %[1]s/signkey.pem\nissuercert = %[1]s/issuercert.pem\ncertserial = %[1]s/certserial\n", l.ca))
	caOpts := filepath.Join(dir, "localca.options")
	writeFile(t, caOpts, "--platform-manufacturer sovra\n--platform-version 2.1\n--platform-model test\n")
	setupConf := filepath.Join(dir, "setup.conf")
	writeFile(t, setupConf, fmt.Sprintf("create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = %s\ncreate_certs_tool_options = %s\nactive_pcr_banks = sha1,sha256\n", caConf, caOpts))
	for i := range l.tpms {
		state := filepath.Join(dir, fmt.Sprintf("tpm%d", i))
		if err := os.MkdirAll(state, 0o700); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command("swtpm_setup", "--tpm2", "--tpmstate", state, "--create-ek-cert",
			"--create-platform-cert", "--config", setupConf, "--overwrite").CombinedOutput()
		if err != nil {
			t.Fatalf("swtpm_setup: %v\n%s", err, out)
		}
		port, ctrl := freePort(t), freePort(t)
		cmd := exec.Command("swtpm", "socket", "--tpm2", "--tpmstate", "dir="+state,
			"--server", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", port),
			"--ctrl", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", ctrl),
			"--flags", "not-need-init,startup-clear")
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatalf("starting swtpm: %v", err)
		}
		t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
		l.tpms[i] = swtpm.TCP{Addr: fmt.Sprintf("127.0.0.1:%d", port)}
		waitPort(t, l.tpms[i].Addr)
		logDir := filepath.Join(dir, fmt.Sprintf("log%d", i))
		if err := os.MkdirAll(logDir, 0o700); err != nil {
			t.Fatal(err)
		}
		l.logs[i] = boot(t, l.tpms[i], logDir)
	}
	return l
}

func (l *swtpmLab) use(t *testing.T, i int) (agentattest.TPM, string) { return l.tpms[i], l.logs[i] }
func (l *swtpmLab) ekCertificates() bool                              { return true }
func (l *swtpmLab) restore(*testing.T) bool                           { return false }

// ekPolicy trusts the local CA: its root, with its issuing CA as intermediate.
func (l *swtpmLab) ekPolicy(t *testing.T) attest.EKPolicy {
	roots, inter := poolFromFile(t, filepath.Join(l.ca, "swtpm-localca-rootca-cert.pem")), poolFromFile(t, filepath.Join(l.ca, "issuercert.pem"))
	return attest.EKPolicy{Roots: roots, Intermediates: inter}
}

func writeFile(t testing.TB, p, s string) {
	t.Helper()
	if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func waitPort(t testing.TB, addr string) {
	t.Helper()
	const attempts = 100
	for range attempts {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("swtpm did not listen on %s", addr)
}

func poolFromFile(t testing.TB, p string) *x509.CertPool {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		t.Fatalf("no certificate in %s", p)
	}
	return pool
}
