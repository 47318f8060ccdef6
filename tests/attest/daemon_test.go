package attest

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/zapr"
	kmsapi "github.com/siderolabs/kms-client/api/kms"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"

	agentattest "github.com/sovra-dev/sovra/agent/attest"
	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/attestation"
	pb "github.com/sovra-dev/sovra/internal/nodeapi"
	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/sovradtest"
)

const (
	// nodeAddr is the source address of the node under test; attackers
	// call from other addresses of this host.
	nodeAddr = "127.0.0.1"
	// readyTimeout bounds the wait for the node API and the KMS once the
	// Kubernetes API is ready (sovrad installs the CRDs first).
	readyTimeout = 60 * time.Second
	// talosTimeout is the deadline Talos gives every KMS call.
	talosTimeout = 10 * time.Second
	// callTimeout bounds one node API call of a test.
	callTimeout = 30 * time.Second
	// converge bounds waits for a replica's caches to see a record change.
	converge  = 20 * time.Second
	pollPause = 100 * time.Millisecond
)

// The API clients of the tests log nothing of their own (controller-runtime
// warns, with a stack, when no logger was set).
func init() { ctrllog.SetLogger(zapr.NewLogger(zap.NewNop())) }

// zeroUUID is a UUID no record claims.
const zeroUUID = "00000000-0000-0000-0000-000000000000"

// daemon is a running bin/sovrad reached as nodes and operators reach it:
// the node API over TLS (the Talos KMS on the same port, as in the default
// deployment) and the Kubernetes API with the admin kubeconfig.
type daemon struct {
	*sovradtest.Daemon
	// Addr is the node API's (and the KMS's) address.
	Addr string
	// nodeCA issues node credentials and the node API's serving
	// certificate; roots holds it.
	nodeCA *x509.Certificate
	roots  *x509.CertPool
	// kube reads and writes records with the admin kubeconfig.
	kube client.Client
	// api is the node API as the node under test reaches it (from nodeAddr).
	api pb.NodeServiceClient
}

// startDaemon starts bin/sovrad on SQLite in a fresh data directory with a
// fresh master keyring (outside it) and extra flags.
func startDaemon(t testing.TB, extra ...string) *daemon {
	t.Helper()
	return startDaemonWith(t, filepath.Join(t.TempDir(), "data"), filepath.Join(t.TempDir(), "master.key"), extra...)
}

// startDaemonWith starts bin/sovrad with dataDir, the master keyring
// keyFile (the KMS serves on the node API's port) and extra flags, and waits
// until its node API and KMS answer.
func startDaemonWith(t testing.TB, dataDir, keyFile string, extra ...string) *daemon {
	t.Helper()
	addr := net.JoinHostPort(nodeAddr, strconv.Itoa(testutil.FreePort(t)))
	args := append([]string{"--node-listen", addr, "--master-key-file", keyFile, "--controllers", "none"}, extra...)
	d := &daemon{Daemon: sovradtest.Start(t, dataDir, args...), Addr: addr}
	d.nodeCA = readCert(t, filepath.Join(dataDir, "node-ca.crt"))
	d.roots = x509.NewCertPool()
	d.roots.AddCert(d.nodeCA)
	cfg, err := clientcmd.BuildConfigFromFlags("", d.Kubeconfig())
	if err != nil {
		t.Fatal(err)
	}
	cfg.QPS, cfg.Burst = 200, 400
	cfg.ContentType = runtime.ContentTypeJSON
	scheme, err := attestation.Scheme()
	if err != nil {
		t.Fatal(err)
	}
	if d.kube, err = client.New(cfg, client.Options{Scheme: scheme}); err != nil {
		t.Fatal(err)
	}
	d.api = d.nodeClient(t, nodeAddr)
	d.waitReady(t)
	return d
}

// waitReady waits until the node API issues nonces and the KMS judges
// calls (it answers Unavailable until its caches have synced).
func (d *daemon) waitReady(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(readyTimeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, nerr := d.api.GetNonce(ctx, &pb.NonceRequest{Node: "ek-ready"})
		cancel()
		var kerr error
		if nerr == nil {
			_, kerr = d.unseal(context.Background(), zeroUUID, []byte{1})
			if status.Code(kerr) == codes.PermissionDenied {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("node API or KMS not ready: %v / %v\n%s", nerr, kerr, d.Tail(30))
		}
		time.Sleep(pollPause)
	}
}

func readCert(t testing.TB, path string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(b)
	if block == nil {
		t.Fatalf("no PEM certificate in %s", path)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

// dial connects to the node API from source address src (an address of
// this host, e.g. 127.0.0.2), presenting the client certificate cert
// returns (none when nil), and closes the connection when the test ends.
func (d *daemon) dial(t testing.TB, src string, cert func(*tls.CertificateRequestInfo) (*tls.Certificate, error)) *grpc.ClientConn {
	t.Helper()
	cfg := &tls.Config{RootCAs: d.roots, MinVersion: tls.VersionTLS13, GetClientCertificate: cert}
	local := &net.TCPAddr{IP: net.ParseIP(src)}
	conn, err := grpc.NewClient(d.Addr,
		grpc.WithTransportCredentials(credentials.NewTLS(cfg)),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{LocalAddr: local}).DialContext(ctx, "tcp", addr)
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// nodeClient is the node API's NodeService as reached from src.
func (d *daemon) nodeClient(t testing.TB, src string) pb.NodeServiceClient {
	return agentattest.NewClient(d.dial(t, src, nil))
}

// clusterClient is the ClusterService as reached from the node's address
// with the client certificate cert returns.
func (d *daemon) clusterClient(t testing.TB, cert func(*tls.CertificateRequestInfo) (*tls.Certificate, error)) pb.ClusterServiceClient {
	return pb.NewClusterServiceClient(d.dial(t, nodeAddr, cert))
}

// fixed presents one credential whatever the node holds later.
func fixed(c *agentattest.Credential) func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	return func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &c.Certificate, nil }
}

// seal calls Seal as Talos does when it formats a volume.
func (d *daemon) seal(ctx context.Context, uuid string, data []byte) ([]byte, error) {
	return d.kms(ctx, true, uuid, data)
}

// unseal calls Unseal as Talos does on every boot.
func (d *daemon) unseal(ctx context.Context, uuid string, blob []byte) ([]byte, error) {
	return d.kms(ctx, false, uuid, blob)
}

// kms calls the KMS as Talos does (internal/pkg/encryption/keys/kms.go): a
// fresh connection per call, TLS with the platform's roots (here the node
// CA), no client certificate, a shared write buffer, the upstream client.
func (d *daemon) kms(ctx context.Context, seal bool, uuid string, data []byte) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, talosTimeout)
	defer cancel()
	conn, err := grpc.NewClient(d.Addr,
		grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: d.roots})),
		grpc.WithSharedWriteBuffer(true))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	c := kmsapi.NewKMSServiceClient(conn)
	var resp *kmsapi.Response
	if seal {
		resp, err = c.Seal(ctx, &kmsapi.Request{NodeUuid: uuid, Data: data})
	} else {
		resp, err = c.Unseal(ctx, &kmsapi.Request{NodeUuid: uuid, Data: data})
	}
	if err != nil {
		return nil, err
	}
	return resp.GetData(), nil
}

// node reads a record through the API.
func (d *daemon) node(t testing.TB, name string) *v1alpha1.SovraNode {
	t.Helper()
	var n v1alpha1.SovraNode
	if err := d.kube.Get(context.Background(), client.ObjectKey{Name: name}, &n); err != nil {
		t.Fatalf("reading SovraNode %s: %v", name, err)
	}
	return &n
}

// nodes returns every record.
func (d *daemon) nodes(t testing.TB) []v1alpha1.SovraNode {
	t.Helper()
	var list v1alpha1.SovraNodeList
	if err := d.kube.List(context.Background(), &list); err != nil {
		t.Fatal(err)
	}
	return list.Items
}

// markers returns the names of the used-nonce markers.
func (d *daemon) markers(t testing.TB) map[string]bool {
	t.Helper()
	var list v1alpha1.AttestationNonceList
	if err := d.kube.List(context.Background(), &list); err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, m := range list.Items {
		out[m.Name] = true
	}
	return out
}

// attestationEvents returns the events the attestation service recorded,
// by name.
func (d *daemon) attestationEvents(t testing.TB) map[string]corev1.Event {
	t.Helper()
	var list corev1.EventList
	if err := d.kube.List(context.Background(), &list, client.InNamespace(attestation.EventNamespace)); err != nil {
		t.Fatal(err)
	}
	out := map[string]corev1.Event{}
	for _, e := range list.Items {
		if e.Source.Component == attestation.EventSource {
			out[e.Name] = e
		}
	}
	return out
}

// kubectl runs the built kubectl with the admin kubeconfig on behalf of t
// (a subtest may call it) and returns stdout, failing t on error.
func (d *daemon) kubectl(t testing.TB, args ...string) string {
	t.Helper()
	out, err := sovradtest.Kubectl(t, append([]string{"--kubeconfig", d.Kubeconfig()}, args...)...)
	if err != nil {
		t.Fatalf("kubectl %s: %v", strings.Join(args, " "), err)
	}
	return out
}

// logLine is one line of the daemon's JSON log.
type logLine struct {
	Time time.Time `json:"time"`
	Msg  string    `json:"msg"`
	// Fields are every field of the line, as strings where they are.
	Fields map[string]any `json:"-"`
}

func (l logLine) field(name string) string {
	s, _ := l.Fields[name].(string)
	return s
}

// logSince parses the daemon's log from offset off.
func (d *daemon) logSince(off int64) []logLine {
	var out []logLine
	sc := bufio.NewScanner(strings.NewReader(d.LogSince(off)))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		var l logLine
		if json.Unmarshal(sc.Bytes(), &l) != nil {
			continue
		}
		_ = json.Unmarshal(sc.Bytes(), &l.Fields)
		out = append(out, l)
	}
	return out
}

// denialLogEvery is the attestation service's throttle of its refusal log
// lines, per node and reason (daemon/attestation/helpers.go).
const denialLogEvery = 10 * time.Second

// requireDenialLogged checks that lines (the log since an action that
// started at start) hold the attestation service's refusal of node for
// reason, or that a line about both was logged less than denialLogEvery
// before start (the service then logs no other).
func (d *daemon) requireDenialLogged(t testing.TB, lines []logLine, start time.Time, node, reason string) {
	t.Helper()
	match := func(l logLine) bool {
		return l.Msg == "denied" && l.field("node") == node && l.field("reason") == reason
	}
	for _, l := range lines {
		if match(l) {
			t.Logf("logged: denied %s (%s): %s", node, reason, l.field("error"))
			return
		}
	}
	for _, l := range d.logSince(0) {
		if match(l) && l.Time.After(start.Add(-denialLogEvery-time.Second)) {
			t.Logf("not logged again: a line about %s (%s) was logged %s before", node, reason, start.Sub(l.Time).Round(time.Millisecond))
			return
		}
	}
	t.Fatalf("the daemon logged no refusal of %s (%s) since the action started", node, reason)
}

// requireStatus fails t unless err is a gRPC status with code and a
// message containing want.
func requireStatus(t testing.TB, err error, code codes.Code, want string) {
	t.Helper()
	st, _ := status.FromError(err)
	if err == nil || st.Code() != code || !strings.Contains(st.Message(), want) {
		t.Fatalf("got %v, want %s containing %q", err, code, want)
	}
}

// newCA returns a self-signed CA certificate and key.
func newCA(t testing.TB, name string) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return cert, key
}

// writePEM writes cert to a PEM file in a temporary directory.
func writePEM(t testing.TB, cert *x509.Certificate) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}
