package attest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"

	agentattest "github.com/sovra-dev/sovra/agent/attest"
	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/attestation"
	"github.com/sovra-dev/sovra/daemon/nodeapi"
	"github.com/sovra-dev/sovra/internal/attest"
	pb "github.com/sovra-dev/sovra/internal/nodeapi"
)

// fakeClock is a settable Clock.
type fakeClock struct {
	mu  sync.Mutex // guards now
	now time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// daemon is a node API server on a fake API, reached over TLS.
type daemon struct {
	addr   string
	kube   client.Client
	store  *attestation.KubeStore
	clock  *fakeClock
	api    pb.NodeServiceClient
	nodeCA *x509.Certificate
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

func serverTLS(t testing.TB) (*tls.Config, *x509.CertPool) {
	t.Helper()
	ca, caKey := newCA(t, "sovra node API test CA")
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "sovrad"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}, pool
}

func startDaemon(t testing.TB, ek attest.EKPolicy) *daemon {
	t.Helper()
	scheme, err := attestation.Scheme()
	if err != nil {
		t.Fatal(err)
	}
	store := &attestation.KubeStore{Logger: zaptest.NewLogger(t)}
	if kc := os.Getenv(kubeconfigEnv); kc != "" {
		store = realAPI(t, kc)
	} else {
		store.Client = fake.NewClientBuilder().WithScheme(scheme).WithStatusSubresource(&v1alpha1.SovraNode{}).Build()
	}
	kube := store.Client
	nodeCA, nodeCAKey := newCA(t, "sovra node CA")
	srvTLS, pool := serverTLS(t)
	clk := &fakeClock{now: time.Now()}
	srv, err := nodeapi.NewServerWithStore(nodeapi.Config{
		TLS:         srvTLS,
		Attestation: attestation.Config{EK: ek, NodeCA: nodeCA, NodeCAKey: nodeCAKey},
	}, store, clk, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, lis) }()
	t.Cleanup(func() { cancel(); <-done })
	conn, err := agentattest.DialTLS(lis.Addr().String(), &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &daemon{addr: lis.Addr().String(), kube: kube, store: store, clock: clk, api: agentattest.NewClient(conn), nodeCA: nodeCA}
}

var _ grpc.ClientConnInterface = (*grpc.ClientConn)(nil)

// kubeconfigEnv names a kubeconfig of a running sovrad: when set, the
// stories keep their records in its API (CRDs installed first) instead of a
// fake client, and show them with kubectl.
const kubeconfigEnv = "SOVRA_KUBECONFIG"

func realAPI(t testing.TB, kubeconfig string) *attestation.KubeStore {
	t.Helper()
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	store, err := attestation.NewKubeStore(cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := attestation.InstallCRDs(ctx, store.Client); err != nil {
		t.Fatal(err)
	}
	if err := attestation.WaitForCRDs(ctx, store.Client); err != nil {
		t.Fatal(err)
	}
	return store
}
