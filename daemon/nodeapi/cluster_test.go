package nodeapi

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/attestation"
	"github.com/sovra-dev/sovra/daemon/membership"
	"github.com/sovra-dev/sovra/daemon/nodeauth"
	"github.com/sovra-dev/sovra/internal/attest"
	pb "github.com/sovra-dev/sovra/internal/nodeapi"
)

type testCA struct {
	cert *x509.Certificate
	key  crypto.Signer
}

func newTestCA(t *testing.T, name string) testCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return testCA{cert, key}
}

// issue signs a leaf: a server certificate for 127.0.0.1, or a client one.
func (ca testCA) issue(t *testing.T, cn string, org []string, server bool, notAfter time.Time) tls.Certificate {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn, Organization: org},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: notAfter, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der, ca.cert.Raw}, PrivateKey: key}
}

func clusterNode(name, cluster, addr, result string) *v1alpha1.SovraNode {
	n := &v1alpha1.SovraNode{
		ObjectMeta: metav1.ObjectMeta{Name: name, UID: types.UID("uid-" + name), Labels: map[string]string{membership.LabelCluster: cluster}, CreationTimestamp: metav1.NewTime(time.Now().Add(-time.Hour))},
		Spec:       v1alpha1.SovraNodeSpec{EKHash: strings.Repeat("a", 64), EKPublic: []byte{1}, AKPublic: []byte{1}, Addresses: []string{addr}},
		Status:     v1alpha1.SovraNodeStatus{LastAttestationResult: result},
	}
	cond := func(typ string, on bool) {
		st := metav1.ConditionFalse
		if on {
			st = metav1.ConditionTrue
		}
		n.Status.Conditions = append(n.Status.Conditions, metav1.Condition{Type: typ, Status: st, Reason: "Test", LastTransitionTime: metav1.Now()})
	}
	cond(v1alpha1.ConditionEnrolled, true)
	cond(v1alpha1.ConditionAttested, result == v1alpha1.ResultPassed)
	return n
}

// credential issues a node credential for record name (its UID as
// clusterNode gives it, or uid when set), valid until notAfter.
func (ca testCA) credential(t *testing.T, name string, uid types.UID, notAfter time.Time) tls.Certificate {
	t.Helper()
	if uid == "" {
		uid = types.UID("uid-" + name)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	now := time.Now()
	tmpl := nodeauth.Template(nodeauth.Credential{Node: name, UID: uid, Boot: "boot-1"}, big.NewInt(now.UnixNano()), now, notAfter.Sub(now))
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der, ca.cert.Raw}, PrivateKey: key}
}

// startClusterAPI serves the node API with a ClusterService on a fake
// client holding nodes, and returns its address and the node CA.
func startClusterAPI(t *testing.T, nodes ...*v1alpha1.SovraNode) (string, testCA) {
	t.Helper()
	return startNodeAPI(t, 0, nodes...)
}

// startNodeAPI serves the node API with peerRate (Config.PeerRate) over a
// fake API holding nodes.
func startNodeAPI(t *testing.T, peerRate float64, nodes ...*v1alpha1.SovraNode) (string, testCA) {
	t.Helper()
	ca := newTestCA(t, "node CA")
	s, err := membership.Scheme()
	if err != nil {
		t.Fatal(err)
	}
	b := fake.NewClientBuilder().WithScheme(s).WithStatusSubresource(&v1alpha1.SovraNode{})
	for _, n := range nodes {
		b = b.WithObjects(n)
	}
	kube := b.Build()
	store := quietStore{&attestation.KubeStore{Client: kube, Logger: zap.NewNop()}}
	serving := ca.issue(t, "sovrad", nil, true, time.Now().Add(time.Hour))
	srv, err := NewServerWithStore(Config{
		TLS:         &tls.Config{Certificates: []tls.Certificate{serving}},
		Attestation: attestation.Config{EK: attest.EKPolicy{TrustOnFirstUse: true}, NodeCA: ca.cert, NodeCAKey: ca.key},
		Cluster:     membership.New(membership.Config{}, kube, store, nil, zap.NewNop()),
		PeerRate:    peerRate,
	}, store, nil, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(ctx, lis) }()
	t.Cleanup(func() { cancel(); <-done })
	return lis.Addr().String(), ca
}

func dialCluster(t *testing.T, addr string, serverCA testCA, cert *tls.Certificate) pb.ClusterServiceClient {
	t.Helper()
	return pb.NewClusterServiceClient(dialNodeAPI(t, addr, serverCA, cert))
}

func dialNodeAPI(t *testing.T, addr string, serverCA testCA, cert *tls.Certificate) *grpc.ClientConn {
	t.Helper()
	roots := x509.NewCertPool()
	roots.AddCert(serverCA.cert)
	cfg := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS13}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// TestPeerRateLimitsCallsWithoutCredential: past its burst, an address's
// enrollment, nonce and attestation calls are refused with
// ResourceExhausted (agents retry it with backoff); the ClusterService,
// which needs the node credential, is not limited by it.
func TestPeerRateLimitsCallsWithoutCredential(t *testing.T) {
	addr, ca := startNodeAPI(t, 1, clusterNode("ek-a", "prod", "10.0.0.1", v1alpha1.ResultPassed))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	nodes := pb.NewNodeServiceClient(dialNodeAPI(t, addr, ca, nil))
	var refused int
	for range minPeerBurst + 5 {
		_, err := nodes.GetNonce(ctx, &pb.NonceRequest{Node: "ek-unknown"})
		if status.Code(err) == codes.ResourceExhausted {
			refused++
			if !strings.Contains(err.Error(), "127.0.0.1") {
				t.Fatalf("refusal does not name the address: %v", err)
			}
		}
	}
	if refused < 4 || refused > 5 {
		t.Fatalf("%d of %d calls refused, want the 5 past the burst of %d (one may refill)", refused, minPeerBurst+5, minPeerBurst)
	}
	stream, err := nodes.Enroll(ctx)
	if err == nil {
		_, err = stream.Recv()
	}
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("Enroll over the limit = %v, want ResourceExhausted", err)
	}

	cred := ca.credential(t, "ek-a", "", time.Now().Add(time.Hour))
	cluster := dialCluster(t, addr, ca, &cred)
	for range minPeerBurst + 5 {
		if _, err := cluster.ListMembers(ctx, &pb.ListMembersRequest{}); err != nil {
			t.Fatalf("ListMembers from the same address: %v", err)
		}
	}
}

func TestClusterServiceAuthentication(t *testing.T) {
	addr, ca := startClusterAPI(t,
		clusterNode("ek-a", "prod", "10.0.0.1", v1alpha1.ResultPassed),
		clusterNode("ek-b", "prod", "10.0.0.2", v1alpha1.ResultPassed),
		clusterNode("ek-c", "prod", "10.0.0.3", v1alpha1.ResultFailed),
		clusterNode("ek-x", "other", "10.0.0.9", v1alpha1.ResultPassed))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	hour := time.Now().Add(time.Hour)

	good := ca.credential(t, "ek-a", "", hour)
	resp, err := dialCluster(t, addr, ca, &good).ListMembers(ctx, &pb.ListMembersRequest{Address: "10.0.0.1"})
	if err != nil {
		t.Fatalf("ListMembers with the node credential: %v", err)
	}
	var names []string
	for _, m := range resp.GetMembers() {
		names = append(names, m.GetNode())
	}
	if resp.GetCluster() != "prod" || strings.Join(names, ",") != "ek-a,ek-b" {
		t.Fatalf("members = %s %v, want ek-a,ek-b of prod (not the failed ek-c, not ek-x of another cluster)", resp.GetCluster(), names)
	}

	lease, err := dialCluster(t, addr, ca, &good).BootstrapLease(ctx, &pb.BootstrapLeaseRequest{Phase: pb.BootstrapPhase_BOOTSTRAP_PHASE_HELD, Address: "10.0.0.1"})
	if err != nil || !lease.GetGranted() || lease.GetHolder() != "ek-a" || lease.GetPhase() != pb.BootstrapPhase_BOOTSTRAP_PHASE_HELD || lease.GetExpiresUnix() == 0 {
		t.Fatalf("BootstrapLease = %v, %v", lease, err)
	}
	other := ca.credential(t, "ek-b", "", hour)
	lease, err = dialCluster(t, addr, ca, &other).BootstrapLease(ctx, &pb.BootstrapLeaseRequest{Phase: pb.BootstrapPhase_BOOTSTRAP_PHASE_HELD, Address: "10.0.0.2"})
	if err != nil || lease.GetGranted() || lease.GetHolder() != "ek-a" || lease.GetHolderAddress() != "10.0.0.1" {
		t.Fatalf("second node's BootstrapLease = %v, %v; want denied, held by ek-a", lease, err)
	}
	members := func() string {
		resp, err := dialCluster(t, addr, ca, &other).ListMembers(ctx, &pb.ListMembersRequest{})
		if err != nil {
			t.Fatal(err)
		}
		return resp.GetBootstrapAddress()
	}
	if got := members(); got != "" {
		t.Fatalf("bootstrap address of a held lease = %q, want none until committed", got)
	}
	if _, err := dialCluster(t, addr, ca, &good).BootstrapLease(ctx, &pb.BootstrapLeaseRequest{Phase: pb.BootstrapPhase_BOOTSTRAP_PHASE_BOOTSTRAPPING, Address: "10.0.0.1"}); err != nil {
		t.Fatal(err)
	}
	if got := members(); got != "10.0.0.1" {
		t.Fatalf("bootstrap address of the committed lease = %q, want 10.0.0.1", got)
	}

	wrongCA := newTestCA(t, "node CA") // same name, other key
	forged := wrongCA.credential(t, "ek-a", "", hour)
	earlier := ca.credential(t, "ek-a", "uid-of-the-deleted-record", hour)
	notNode := ca.issue(t, "ek-a", []string{"somebody"}, false, hour)
	failed := ca.credential(t, "ek-c", "", hour)
	for name, c := range map[string]struct {
		cert *tls.Certificate
		code codes.Code
	}{
		"no client certificate": {nil, codes.Unauthenticated},
		"another CA":            {&forged, codes.Unauthenticated},
		"not a node credential": {&notNode, codes.Unauthenticated},
		"node not attested":     {&failed, codes.PermissionDenied},
		"earlier record":        {&earlier, codes.PermissionDenied},
	} {
		client := dialCluster(t, addr, ca, c.cert)
		_, err := client.ListMembers(ctx, &pb.ListMembersRequest{})
		if status.Code(err) != c.code {
			t.Errorf("%s: ListMembers = %v, want %s", name, err, c.code)
		}
		_, err = client.BootstrapLease(ctx, &pb.BootstrapLeaseRequest{Phase: pb.BootstrapPhase_BOOTSTRAP_PHASE_HELD, Address: "10.0.0.1"})
		if status.Code(err) != c.code {
			t.Errorf("%s: BootstrapLease = %v, want %s", name, err, c.code)
		}
	}

	if _, err := dialCluster(t, addr, ca, &good).BootstrapLease(ctx, &pb.BootstrapLeaseRequest{Address: "10.0.0.1"}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("unspecified phase: %v, want InvalidArgument", err)
	}
}

func TestClusterServiceRefusesExpiredCredential(t *testing.T) {
	addr, ca := startClusterAPI(t, clusterNode("ek-a", "prod", "10.0.0.1", v1alpha1.ResultPassed))
	expired := ca.credential(t, "ek-a", "", time.Now().Add(-time.Second))
	_, err := dialCluster(t, addr, ca, &expired).ListMembers(context.Background(), &pb.ListMembersRequest{})
	if status.Code(err) != codes.Unauthenticated {
		t.Fatalf("expired credential: %v, want Unauthenticated", err)
	}
}
