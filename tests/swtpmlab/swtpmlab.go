// Package swtpmlab runs swtpm instances for end-to-end stories: each TPM is
// manufactured by swtpm_setup with an EK certificate from one local CA (which
// sovrad trusts with --ek-roots and --ek-intermediates), serves in socket
// mode on a given address, and is booted: the test firmware's events and the
// Talos UKI are measured into its PCRs and its event log is written. Boot
// and NodeRoot serve the stories that use the TPM simulator too.
package swtpmlab

import (
	"crypto/rand"
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
	"github.com/sovra-dev/sovra/internal/tcglog"
	"github.com/sovra-dev/sovra/internal/testutil"
)

const (
	// listenAttempts and listenPause bound the wait for a swtpm to listen.
	listenAttempts = 100
	listenPause    = 50 * time.Millisecond
	// ukiMeasurement is what the booted TPMs carry in PCR 11.
	ukiMeasurement = "talos uki v1.13.0"
)

// TPM is one running, booted swtpm.
type TPM struct {
	// Addr is its command channel (host:port), for --tpm swtpm:ADDR.
	Addr string
	// EventLog is the path of its TCG event log.
	EventLog string
}

// Lab is a set of swtpm instances from one manufacturer CA.
type Lab struct {
	// Dir is the local CA's directory.
	Dir  string
	TPMs []TPM
}

// Roots and Intermediates are the EK CA files for sovrad's --ek-roots and
// --ek-intermediates.
func (l *Lab) Roots() string         { return filepath.Join(l.Dir, "swtpm-localca-rootca-cert.pem") }
func (l *Lab) Intermediates() string { return filepath.Join(l.Dir, "issuercert.pem") }

// New manufactures and starts n swtpm instances listening on host (an IP
// address of this network namespace), and boots them. They stop when the
// test ends.
func New(t testing.TB, n int, host string) *Lab {
	t.Helper()
	testutil.Require(t, "swtpm", "swtpm_setup", "swtpm_localca")
	dir := t.TempDir()
	l := &Lab{Dir: filepath.Join(dir, "ca")}
	if err := os.MkdirAll(l.Dir, 0o700); err != nil {
		t.Fatal(err)
	}
	caConf := filepath.Join(dir, "localca.conf")
	write(t, caConf, fmt.Sprintf("statedir = %[1]s\nsigningkey = %[1]s/signkey.pem\nissuercert = %[1]s/issuercert.pem\ncertserial = %[1]s/certserial\n", l.Dir))
	caOpts := filepath.Join(dir, "localca.options")
	write(t, caOpts, "--platform-manufacturer sovra\n--platform-version 2.1\n--platform-model test\n")
	setupConf := filepath.Join(dir, "setup.conf")
	write(t, setupConf, fmt.Sprintf("create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = %s\ncreate_certs_tool_options = %s\nactive_pcr_banks = sha1,sha256\n", caConf, caOpts))
	for i := range n {
		state := filepath.Join(dir, fmt.Sprintf("tpm%d", i))
		if err := os.MkdirAll(state, 0o700); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command("swtpm_setup", "--tpm2", "--tpmstate", state, "--create-ek-cert",
			"--create-platform-cert", "--config", setupConf, "--overwrite").CombinedOutput()
		if err != nil {
			t.Fatalf("swtpm_setup: %v\n%s", err, out)
		}
		port, ctrl := testutil.FreePortOn(t, host), testutil.FreePortOn(t, host)
		cmd := exec.Command("swtpm", "socket", "--tpm2", "--tpmstate", "dir="+state,
			"--server", fmt.Sprintf("type=tcp,port=%d,bindaddr=%s", port, host),
			"--ctrl", fmt.Sprintf("type=tcp,port=%d,bindaddr=%s", ctrl, host),
			"--flags", "not-need-init,startup-clear")
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatalf("starting swtpm: %v", err)
		}
		t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
		tpm := TPM{Addr: net.JoinHostPort(host, fmt.Sprint(port))}
		waitListen(t, tpm.Addr)
		logDir := filepath.Join(dir, fmt.Sprintf("log%d", i))
		if err := os.MkdirAll(logDir, 0o700); err != nil {
			t.Fatal(err)
		}
		tpm.EventLog = Boot(t, swtpm.TCP{Addr: tpm.Addr}, logDir)
		l.TPMs = append(l.TPMs, tpm)
	}
	return l
}

// Opener opens a TPM's command channel (swtpm, the simulator, a device).
type Opener interface {
	Open() (io.ReadWriteCloser, error)
}

// Boot plays the firmware on a freshly reset TPM: it measures the test
// firmware into PCRs 0-7 and the Talos UKI into PCR 11, and writes the
// matching event log into dir. It returns the log's path.
func Boot(t testing.TB, tpm Opener, dir string) string {
	t.Helper()
	rw, err := tpm.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer rw.Close()
	extend := func(pcr int, digest []byte) {
		if err := tpm2.PCRExtend(rw, tpmutil.Handle(pcr), tpm2.AlgSHA256, digest, ""); err != nil {
			t.Fatalf("extending PCR %d: %v", pcr, err)
		}
	}
	log := tcglog.Firmware()
	for _, e := range log.Events {
		extend(e.PCR, e.Digest[:])
	}
	uki := tcglog.Log{}
	ev := uki.Measure(11, tcglog.EVAction, []byte(ukiMeasurement))
	extend(11, ev.Digest[:])
	p := filepath.Join(dir, "binary_bios_measurements")
	if err := os.WriteFile(p, log.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func write(t testing.TB, p, s string) {
	t.Helper()
	if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

func waitListen(t testing.TB, addr string) {
	t.Helper()
	for range listenAttempts {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return
		}
		time.Sleep(listenPause)
	}
	t.Fatalf("swtpm did not listen on %s", addr)
}

// NodeRoot is a fake Talos root: the files the agent's claims come from
// (Secure Boot, lockdown, SELinux, AppArmor absent, os-release, one
// installed extension), in a temporary directory.
func NodeRoot(t testing.TB) agentattest.Collector {
	t.Helper()
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	layer := write("layers/000.registry.example-sovra-agent-v0.1.0.sqsh", []byte("squashfs image"))
	return agentattest.Collector{
		SecureBootPath: write("efivars/SecureBoot", []byte{6, 0, 0, 0, 1}),
		LockdownPath:   write("security/lockdown", []byte("none [integrity] confidentiality\n")),
		SELinuxPath:    write("selinux/enforce", []byte("1")),
		AppArmorPath:   filepath.Join(dir, "absent"),
		OSReleasePath:  write("os-release", []byte("NAME=\"Talos\"\nID=talos\nVERSION_ID=v1.13.0\n")),
		ExtensionsPath: write("extensions.yaml", []byte("layers:\n  - image: "+filepath.Base(layer)+"\n    metadata:\n      name: sovra-agent\n      version: v0.1.0\n")),
		LayersDir:      filepath.Dir(layer),
		BootIDPath:     write("proc/sys/kernel/random/boot_id", []byte(newBootID(t)+"\n")),
		StatPath:       write("proc/stat", []byte(fmt.Sprintf("cpu  1 0 1 100 0 0 0 0 0 0\nbtime %d\nprocesses 1\n", time.Now().Unix()))),
	}
}

// Reboot gives the node root of c a new boot: a fresh boot ID, started now.
func Reboot(t testing.TB, c agentattest.Collector) {
	t.Helper()
	write(t, c.BootIDPath, newBootID(t)+"\n")
	write(t, c.StatPath, fmt.Sprintf("cpu  1 0 1 100 0 0 0 0 0 0\nbtime %d\nprocesses 1\n", time.Now().Unix()))
}

// newBootID returns a random boot ID in the kernel's format.
func newBootID(t testing.TB) string {
	t.Helper()
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
