package bootsim_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	stdx509 "crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/client"
	talosconfig "github.com/siderolabs/talos/pkg/machinery/config"
	"github.com/siderolabs/talos/pkg/machinery/config/configloader"
	"github.com/siderolabs/talos/pkg/machinery/config/encoder"
	"github.com/siderolabs/talos/pkg/machinery/config/generate"
	"github.com/siderolabs/talos/pkg/machinery/config/generate/secrets"
	"github.com/siderolabs/talos/pkg/machinery/config/machine"
	"github.com/siderolabs/talos/pkg/machinery/constants"
	"go.yaml.in/yaml/v4"

	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/talosfake"
	"github.com/sovra-dev/sovra/tests/talosfake/bootsimtest"
)

func TestMain(m *testing.M) {
	code := m.Run()

	bootsimtest.Cleanup()
	os.RemoveAll(probeDir) //nolint:errcheck
	os.Exit(code)
}

// cluster is the Talos PKI of a test cluster and an admin talosconfig.
type cluster struct {
	bundle *secrets.Bundle
	pki    *talosfake.PKI
}

func newCluster(t *testing.T) *cluster {
	t.Helper()

	bundle, err := secrets.NewBundle(secrets.NewFixedClock(time.Now()), talosconfig.TalosVersionCurrent)
	if err != nil {
		t.Fatal(err)
	}

	raw, err := yaml.Marshal(bundle)
	if err != nil {
		t.Fatal(err)
	}

	pki, err := talosfake.PKIFromBundle("sim", raw)
	if err != nil {
		t.Fatal(err)
	}

	return &cluster{bundle: bundle, pki: pki}
}

// config is the cluster's machine configuration of type mt (install disk
// /dev/sda, control-plane endpoint endpoint) followed by more documents.
func (c *cluster) config(t *testing.T, mt machine.Type, endpoint string, docs ...string) []byte {
	t.Helper()

	in, err := generate.NewInput("sim", endpoint, constants.DefaultKubernetesVersion,
		generate.WithSecretsBundle(c.bundle), generate.WithInstallDisk("/dev/sda"))
	if err != nil {
		t.Fatal(err)
	}

	cfg, err := in.Config(mt)
	if err != nil {
		t.Fatal(err)
	}

	b, err := cfg.EncodeBytes(encoder.WithComments(encoder.CommentsDisabled))
	if err != nil {
		t.Fatal(err)
	}

	for _, d := range docs {
		b = append(b, []byte("---\n"+strings.TrimSpace(d)+"\n")...)
	}

	if _, err := configloader.NewFromBytes(b); err != nil {
		t.Fatalf("test config does not load: %v", err)
	}

	return b
}

// client is a Talos API client of the cluster's admin on endpoint.
func (c *cluster) client(t *testing.T, endpoint string) *client.Client {
	t.Helper()

	cl, err := client.New(context.Background(), client.WithConfig(c.pki.Talosconfig), client.WithEndpoints(endpoint))
	if err != nil {
		t.Fatal(err)
	}

	t.Cleanup(func() { cl.Close() })

	return cl
}

// testCA is a CA for the test's HTTPS servers (the roots the machine trusts).
type testCA struct {
	cert *stdx509.Certificate
	key  *ecdsa.PrivateKey
	PEM  []byte
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}

	tmpl := &stdx509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: stdx509.KeyUsageCertSign,
	}

	der, err := stdx509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}

	cert, _ := stdx509.ParseCertificate(der) //nolint:errcheck

	return &testCA{cert: cert, key: key, PEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// serverCert is a certificate for 127.0.0.1.
func (ca *testCA) serverCert(t *testing.T) tls.Certificate {
	t.Helper()

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}

	tmpl := &stdx509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "config server"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, ExtKeyUsage: []stdx509.ExtKeyUsage{stdx509.ExtKeyUsageServerAuth},
	}

	der, err := stdx509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}

	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// configServer serves machine configurations over HTTPS, as sovrad's boot
// server would, and records every request.
type configServer struct {
	*httptest.Server

	// mu guards the fields below.
	mu       sync.Mutex
	requests []string
	// fail answers the next requests 503.
	fail int
	// configs by the value of query parameter uuid.
	configs map[string][]byte
}

func newConfigServer(t *testing.T, ca *testCA) *configServer {
	t.Helper()

	s := &configServer{configs: map[string][]byte{}}
	s.Server = httptest.NewUnstartedServer(http.HandlerFunc(s.serve))
	s.TLS = &tls.Config{Certificates: []tls.Certificate{ca.serverCert(t)}, MinVersion: tls.VersionTLS12}
	s.StartTLS()
	t.Cleanup(s.Close)

	return s
}

func (s *configServer) serve(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()

	s.requests = append(s.requests, r.URL.RequestURI())

	if s.fail > 0 {
		s.fail--
		http.Error(w, "not yet", http.StatusServiceUnavailable)

		return
	}

	cfg, ok := s.configs[r.URL.Query().Get("uuid")]
	if !ok {
		http.NotFound(w, r)

		return
	}

	w.Write(cfg) //nolint:errcheck
}

func (s *configServer) set(uuid string, cfg []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()

	s.configs[uuid] = cfg
}

func (s *configServer) failNext(n int) {
	s.mu.Lock()
	defer s.mu.Unlock()

	s.fail = n
}

func (s *configServer) seen() []string {
	s.mu.Lock()
	defer s.mu.Unlock()

	return append([]string(nil), s.requests...)
}

// writeFile writes content to a new file in the test's directory.
func writeFile(t *testing.T, name string, content []byte) string {
	t.Helper()

	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, content, 0o600); err != nil {
		t.Fatal(err)
	}

	return p
}

// probeDir holds the probe binary built for this test binary.
var probeDir = filepath.Join(os.TempDir(), fmt.Sprintf("sovra-bootsim-probe-%d", os.Getpid()))

var probeBinary = sync.OnceValues(func() (string, error) {
	if err := os.MkdirAll(probeDir, 0o700); err != nil {
		return "", err
	}

	out := filepath.Join(probeDir, "probe")
	cmd := exec.Command("go", "build", "-o", out, "github.com/sovra-dev/sovra/tests/talosfake/bootsim/testdata/probe")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")

	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building the probe: %v\n%s", err, b)
	}

	return out, nil
})

// probeSpec is the extension service spec of the probe, like
// extension/sovra-agent.yaml: a state directory on /var, securityfs, a
// device and the configuration as dependencies.
const probeSpec = `name: probe
container:
  entrypoint: ./probe
  environment:
    - PROBE_FROM_SPEC=spec
  mounts:
    - source: /var/lib/probe
      destination: /var/lib/probe
      type: bind
      options: [bind, rw]
    - source: /sys/kernel/security
      destination: /sys/kernel/security
      type: bind
      options: [bind, ro]
    - source: /sys/firmware/efi/efivars
      destination: /sys/firmware/efi/efivars
      type: bind
      options: [bind, ro]
depends:
  - path: /dev/tpmrm0
  - configuration: true
restart: always
`

// probeExtension returns the --extension flag value of the probe.
func probeExtension(t *testing.T) string {
	t.Helper()
	testutil.RequireRoot(t)

	bin, err := probeBinary()
	if err != nil {
		t.Fatal(err)
	}

	return writeFile(t, "probe.yaml", []byte(probeSpec)) + "=" + bin
}

// probeConfig is the probe's ExtensionServiceConfig document.
func probeConfig(greeting string) string {
	return `apiVersion: v1alpha1
kind: ExtensionServiceConfig
name: probe
configFiles:
  - content: ` + greeting + `
    mountPath: /etc/probe/greeting.txt
environment:
  - PROBE_GREETING=` + greeting + `
  - PROBE_STATE=/var/lib/probe
  - PROBE_FILES=/etc/probe/greeting.txt,/sys/kernel/security/tpm0/binary_bios_measurements,/sys/kernel/security/lockdown
`
}

// report is the probe's report (testdata/probe).
type report struct {
	Pid      int               `json:"pid"`
	Env      []string          `json:"env"`
	BootID   string            `json:"bootID"`
	BootTime string            `json:"bootTime"`
	Files    map[string]string `json:"files"`
	Writable map[string]string `json:"writable"`
	Root     []string          `json:"root"`
	Firmware []string          `json:"firmware"`
	Security []string          `json:"security"`
}

// probeReport waits for the probe's report in boot n.
func probeReport(t *testing.T, m *bootsimtest.Machine, boot int) report {
	t.Helper()

	deadline := time.Now().Add(30 * time.Second)

	for {
		for _, line := range strings.Split(m.ExtensionLog(boot, "probe"), "\n") {
			var r report
			if json.Unmarshal([]byte(line), &r) == nil && r.Pid != 0 {
				return r
			}
		}

		if time.Now().After(deadline) {
			t.Fatalf("no probe report in boot %d:\n%s\n%s", boot, m.ExtensionLog(boot, "probe"), m.Tail(30))
		}

		time.Sleep(50 * time.Millisecond)
	}
}

func (r report) env(key string) string {
	for _, kv := range r.Env {
		if k, v, ok := strings.Cut(kv, "="); ok && k == key {
			return v
		}
	}

	return ""
}
