package kms

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	kmsapi "github.com/siderolabs/kms-client/api/kms"
	"github.com/siderolabs/talos/pkg/machinery/config/configloader"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
	"google.golang.org/grpc/status"

	"github.com/sovra-dev/sovra/internal/testutil"
)

const (
	// exampleName is the daemon's name in images/volume-config-kms.yaml:
	// the name an operator gives the daemon with --node-tls-san.
	exampleName = "sovra.example.internal"
	// caPlaceholder starts the line of the example that the operator
	// replaces with the node CA, as docs/operators.md says.
	caPlaceholder = "<node-ca.crt"
)

// TestVolumeConfigExample follows docs/operators.md ("Disk encryption with
// the daemon") on images/volume-config-kms.yaml: it fills in the documented
// placeholder with the daemon's node-ca.crt, loads the documents with Talos's
// own config loader, takes the KMS endpoint of STATE and EPHEMERAL and the
// roots the TrustedRootsConfig adds, and calls the daemon with the upstream
// KMS client as Talos does (a fresh connection per call, TLS with exactly
// those roots), reaching it by the example's name, which the daemon was given
// with --node-tls-san. With ca.crt, the CA the docs used to name, the TLS
// handshake fails.
func TestVolumeConfigExample(t *testing.T) {
	d := startKMS(t, "--node-tls-san", exampleName)
	example, err := os.ReadFile(filepath.Join(testutil.RepoRoot(t), "images", "volume-config-kms.yaml"))
	if err != nil {
		t.Fatal(err)
	}

	endpoints, roots := loadExample(t, example, filepath.Join(d.DataDir, "node-ca.crt"))
	ctx := context.Background()
	n := newNode(t)
	if err := d.createNode(ctx, n, attestedNode); err != nil {
		t.Fatal(err)
	}
	secret := key(t)
	var blob []byte
	for _, endpoint := range endpoints {
		conn := talosConn(t, endpoint, roots, d.KMSAddr)
		if blob == nil {
			blob = sealWith(t, ctx, conn, n, secret)
		}
		resp, err := kmsapi.NewKMSServiceClient(conn).Unseal(ctx, &kmsapi.Request{NodeUuid: n.UUID, Data: blob})
		if err != nil {
			t.Fatalf("Unseal at %s with the example's trust: %v\n%s", endpoint, err, d.Tail(20))
		}
		if !bytes.Equal(resp.GetData(), secret) {
			t.Fatalf("Unseal at %s returned other data", endpoint)
		}
	}

	// The API's CA (ca.crt) does not sign the node API: a node told to
	// trust it cannot reach the KMS.
	endpoints, roots = loadExample(t, example, filepath.Join(d.DataDir, "ca.crt"))
	conn := talosConn(t, endpoints[0], roots, d.KMSAddr)
	ctx, cancel := context.WithTimeout(ctx, talosTimeout)
	defer cancel()
	_, err = kmsapi.NewKMSServiceClient(conn).Unseal(ctx, &kmsapi.Request{NodeUuid: n.UUID, Data: blob})
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "certificate signed by unknown authority") {
		t.Fatalf("Unseal trusting ca.crt: %v; want a failed TLS handshake", err)
	}
}

// loadExample fills the example's CA placeholder with the PEM in caFile and
// loads it as Talos loads a machine configuration. It returns the KMS
// endpoints of the volumes and the roots the TrustedRootsConfig adds.
func loadExample(t *testing.T, example []byte, caFile string) ([]string, *x509.CertPool) {
	t.Helper()
	ca, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	replaced := false
	for _, line := range strings.Split(string(example), "\n") {
		if before, _, ok := strings.Cut(line, caPlaceholder); ok && strings.TrimSpace(before) == "" {
			for _, pem := range strings.Split(strings.TrimSpace(string(ca)), "\n") {
				out = append(out, before+pem)
			}
			replaced = true
			continue
		}
		out = append(out, line)
	}
	if !replaced {
		t.Fatalf("images/volume-config-kms.yaml has no line starting with %q to put node-ca.crt in", caPlaceholder)
	}
	cfg, err := configloader.NewFromBytes([]byte(strings.Join(out, "\n")))
	if err != nil {
		t.Fatalf("Talos does not load the example: %v", err)
	}
	var endpoints []string
	for _, volume := range []string{"STATE", "EPHEMERAL"} {
		vc, ok := cfg.Volumes().ByName(volume)
		if !ok {
			t.Fatalf("the example configures no %s volume", volume)
		}
		keys := vc.Encryption().Keys()
		if len(keys) == 0 || keys[0].KMS() == nil {
			t.Fatalf("%s has no KMS key", volume)
		}
		endpoints = append(endpoints, keys[0].KMS().Endpoint())
	}
	roots := x509.NewCertPool()
	for _, pem := range cfg.TrustedRoots().ExtraTrustedRootCertificates() {
		if !roots.AppendCertsFromPEM([]byte(pem)) {
			t.Fatal("the TrustedRootsConfig holds no certificate Talos could use")
		}
	}
	return endpoints, roots
}

// talosConn connects to endpoint as Talos's KMS key handler does
// (internal/pkg/encryption/keys/kms.go): grpc.NewClient on the endpoint's
// host:port, TLS with the node's roots, no client certificate. The test's
// resolver stands in for DNS: the endpoint's name resolves to addr, and TLS
// verifies the daemon under that name.
func talosConn(t *testing.T, endpoint string, roots *x509.CertPool, addr string) *grpc.ClientConn {
	t.Helper()
	u, err := url.Parse(endpoint)
	if err != nil || u.Scheme != "https" {
		t.Fatalf("endpoint %q: want https://host:port (%v)", endpoint, err)
	}
	if u.Hostname() != exampleName {
		t.Fatalf("endpoint %q: the example names %s", endpoint, exampleName)
	}
	dns := manual.NewBuilderWithScheme("dns")
	dns.InitialState(resolver.State{Addresses: []resolver.Address{{Addr: addr}}})
	conn, err := grpc.NewClient(u.Host,
		grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: roots})),
		grpc.WithResolvers(dns))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// sealWith seals secret for n on conn, retrying while the KMS's cache has
// not seen n's new record.
func sealWith(t *testing.T, ctx context.Context, conn *grpc.ClientConn, n node, secret []byte) []byte {
	t.Helper()
	var err error
	for range 200 {
		var resp *kmsapi.Response
		cctx, cancel := context.WithTimeout(ctx, talosTimeout)
		resp, err = kmsapi.NewKMSServiceClient(conn).Seal(cctx, &kmsapi.Request{NodeUuid: n.UUID, Data: secret})
		cancel()
		if err == nil {
			return resp.GetData()
		}
		if status.Code(err) != codes.PermissionDenied {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("Seal with the example's trust: %v", err)
	return nil
}
