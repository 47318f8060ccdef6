package membership

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"k8s.io/apimachinery/pkg/types"

	"github.com/sovra-dev/sovra/daemon/nodeauth"
	pb "github.com/sovra-dev/sovra/internal/nodeapi"
	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/sovradtest"
)

const (
	// racers is how many nodes of one cluster race for its lease.
	racers      = 16
	callTimeout = 30 * time.Second
)

// lab is a running sovrad with SovraNode records and a way to mint node
// credentials with its node CA, as a passing attestation would.
type lab struct {
	t        *testing.T
	d        *sovradtest.Daemon
	endpoint string
	roots    *x509.CertPool
	ca       *x509.Certificate
	caKey    crypto.Signer
}

func start(t *testing.T) *lab {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "data")
	port := testutil.FreePort(t)
	// No node enrolls here (the records are written with kubectl), but the
	// node API needs an EK policy to start: trust on first use admits none
	// of these calls anyway, which need a node credential.
	d := sovradtest.Start(t, dir, "--node-listen", fmt.Sprintf("127.0.0.1:%d", port), "--ek-trust-on-first-use", "--controllers", "none")
	// sovrad installs its CRDs once the API is ready: records written
	// before the SovraNode CRD is established are refused.
	d.WaitEstablished("sovranodes.sovra.dev")
	l := &lab{t: t, d: d, endpoint: fmt.Sprintf("127.0.0.1:%d", port)}
	caPEM, err := os.ReadFile(filepath.Join(dir, "node-ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(caPEM)
	if l.ca, err = x509.ParseCertificate(block.Bytes); err != nil {
		t.Fatal(err)
	}
	l.roots = x509.NewCertPool()
	l.roots.AddCert(l.ca)
	keyPEM, err := os.ReadFile(filepath.Join(dir, "node-ca.key"))
	if err != nil {
		t.Fatal(err)
	}
	block, _ = pem.Decode(keyPEM)
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	l.caKey = k.(crypto.Signer)
	return l
}

// node writes a SovraNode record with kubectl, labelled with cluster (none
// when empty), with result as its last attestation result. Like an operator
// who pre-registers a node before it enrolls, it gives the EK hash only:
// the CRD takes a record without the EK and AK public keys.
func (l *lab) node(name, cluster, addr, result string) {
	l.t.Helper()
	labels := ""
	if cluster != "" {
		labels = fmt.Sprintf("\n  labels:\n    sovra.dev/cluster: %s", cluster)
	}
	manifest := fmt.Sprintf(`apiVersion: sovra.dev/v1alpha1
kind: SovraNode
metadata:
  name: %s%s
spec:
  ekHash: %q
  hostname: %s
  addresses: [%q]
`, name, labels, strings.TrimPrefix(name, "ek-")+strings.Repeat("0", 32), name, addr)
	p := filepath.Join(l.t.TempDir(), name+".yaml")
	if err := os.WriteFile(p, []byte(manifest), 0o600); err != nil {
		l.t.Fatal(err)
	}
	l.d.Kubectl("apply", "-f", p)
	if result != "" {
		attested := "False"
		if result == "Passed" {
			attested = "True"
		}
		now := time.Now().UTC().Format(time.RFC3339)
		l.d.Kubectl("patch", "sovranode", name, "--subresource=status", "--type=merge",
			"-p", fmt.Sprintf(`{"status":{"lastAttestationResult":%q,"conditions":[`+
				`{"type":"Enrolled","status":"True","reason":"CredentialActivated","message":"","lastTransitionTime":%q},`+
				`{"type":"Attested","status":%q,"reason":"Test","message":"","lastTransitionTime":%q}]}}`, result, now, attested, now))
	}
}

// uid is the UID of record name ("" when there is none).
func (l *lab) uid(name string) types.UID {
	out, _ := l.d.TryKubectl("get", "sovranode", name, "-o", "jsonpath={.metadata.uid}")
	return types.UID(out)
}

// credential mints a node credential for record name (its current
// instance, when it exists) with key signer ca.
func (l *lab) credential(name string, ca *x509.Certificate, caKey crypto.Signer) tls.Certificate {
	t := l.t
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 64))
	uid := l.uid(name)
	if uid == "" {
		uid = "uid-of-a-deleted-record"
	}
	tmpl := nodeauth.Template(nodeauth.Credential{Node: name, UID: uid, Boot: "boot-1"}, serial, time.Now(), time.Hour)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der, ca.Raw}, PrivateKey: key}
}

// client connects with cert as the client certificate (none when nil).
func (l *lab) client(cert *tls.Certificate) pb.ClusterServiceClient {
	l.t.Helper()
	cfg := &tls.Config{RootCAs: l.roots, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS13}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	conn, err := grpc.NewClient(l.endpoint, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { conn.Close() })
	return pb.NewClusterServiceClient(conn)
}

// name is the record name of node i: "ek-" and the first 32 hex digits of
// its EK hash, which is i and zeros.
func name(i int) string { return fmt.Sprintf("ek-%032x", i) }

// notRacer reports whether a record name is not one of the racing nodes'.
func notRacer(record string) bool {
	var i int
	_, err := fmt.Sscanf(record, "ek-%x", &i)
	return err != nil || i >= racers
}

// Records of nodes that do not race.
var (
	failedNode     = name(200)
	unattestedNode = name(201)
	otherNode      = name(300)
	noclusterNode  = name(400)
	deletedNode    = name(500)
)

func addr(i int) string { return fmt.Sprintf("10.70.0.%d", 10+i) }

// TestLeaseRaceOnRealAPI races racers nodes of one cluster, each with its
// own node credential over its own mutual-TLS connection, for the cluster's
// bootstrap lease in the real API: exactly one wins, the others are told who
// holds it; membership lists only the attested nodes of the caller's
// cluster; callers without a node credential are refused.
func TestLeaseRaceOnRealAPI(t *testing.T) {
	l := start(t)
	for i := range racers {
		l.node(name(i), "prod", addr(i), "Passed")
	}
	l.node(failedNode, "prod", "10.70.0.200", "Failed")
	l.node(unattestedNode, "prod", "10.70.0.201", "")
	l.node(otherNode, "other", "10.70.1.10", "Passed")
	l.node(noclusterNode, "", "10.70.2.10", "Passed")

	clients := make([]pb.ClusterServiceClient, racers)
	for i := range clients {
		cert := l.credential(name(i), l.ca, l.caKey)
		clients[i] = l.client(&cert)
	}
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()

	// Warm every connection up (TLS handshakes) so the race is on the lease.
	for i, c := range clients {
		if _, err := c.ListMembers(ctx, &pb.ListMembersRequest{Address: addr(i)}); err != nil {
			t.Fatalf("%s: ListMembers: %v", name(i), err)
		}
	}

	var (
		wg      sync.WaitGroup
		mu      sync.Mutex // guards winners, holders
		winners []string
		holders = map[string]int{}
	)
	begin := make(chan struct{})
	start := time.Now()
	for i, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-begin
			resp, err := c.BootstrapLease(ctx, &pb.BootstrapLeaseRequest{Phase: pb.BootstrapPhase_BOOTSTRAP_PHASE_HELD, Address: addr(i)})
			if err != nil {
				t.Errorf("%s: BootstrapLease: %v", name(i), err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			holders[resp.GetHolder()]++
			if resp.GetGranted() {
				winners = append(winners, name(i))
			}
		}()
	}
	close(begin)
	wg.Wait()
	t.Logf("%d nodes raced for the lease in %s: winners %v, holders seen %v", racers, time.Since(start).Round(time.Millisecond), winners, holders)
	if len(winners) != 1 || len(holders) != 1 || holders[winners[0]] != racers {
		t.Fatalf("winners %v, holders seen %v: want exactly one winner that every node is told of", winners, holders)
	}

	// The winner commits and reports the bootstrap; nobody else can commit.
	var win int
	if _, err := fmt.Sscanf(winners[0], "ek-%x", &win); err != nil {
		t.Fatal(err)
	}
	for _, phase := range []pb.BootstrapPhase{pb.BootstrapPhase_BOOTSTRAP_PHASE_BOOTSTRAPPING, pb.BootstrapPhase_BOOTSTRAP_PHASE_BOOTSTRAPPED} {
		other := (win + 1) % racers
		if resp, err := clients[other].BootstrapLease(ctx, &pb.BootstrapLeaseRequest{Phase: phase, Address: addr(other)}); err != nil || resp.GetGranted() {
			t.Fatalf("%s asked %s: %v, %v; want denied", name(other), phase, resp, err)
		}
		if resp, err := clients[win].BootstrapLease(ctx, &pb.BootstrapLeaseRequest{Phase: phase, Address: addr(win)}); err != nil || !resp.GetGranted() || resp.GetPhase() != phase {
			t.Fatalf("holder asked %s: %v, %v", phase, resp, err)
		}
	}
	lease := l.d.Kubectl("-n", "sovra-system", "get", "lease", "bootstrap-prod", "-o",
		`jsonpath={.spec.holderIdentity} {.metadata.annotations.sovra\.dev/holder-address} {.metadata.annotations.sovra\.dev/bootstrap-phase}`)
	if lease != fmt.Sprintf("%s %s Bootstrapped", winners[0], addr(win)) {
		t.Fatalf("lease = %q", lease)
	}
	denied := l.d.Kubectl("get", "events", "-n", "default", "--field-selector", "reason=BootstrapLeaseDenied", "-o", "jsonpath={.items[*].involvedObject.name}")
	if n := len(strings.Fields(denied)); n < racers-1 {
		t.Fatalf("%d BootstrapLeaseDenied events, want one per loser (%d)", n, racers-1)
	}

	// Membership: the attested nodes of prod, nobody else.
	resp, err := clients[0].ListMembers(ctx, &pb.ListMembersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, m := range resp.GetMembers() {
		names = append(names, m.GetNode())
		if m.GetAddress() != m.GetAddresses()[0] {
			t.Errorf("member %s: announced %q, want its enrolled address", m.GetNode(), m.GetAddress())
		}
	}
	if resp.GetCluster() != "prod" || len(names) != racers || slices.ContainsFunc(names, notRacer) {
		t.Fatalf("members of %s: %v, want the %d attested nodes of prod only", resp.GetCluster(), names, racers)
	}

	// Refusals.
	other := l.credential(otherNode, l.ca, l.caKey)
	if resp, err := l.client(&other).ListMembers(ctx, &pb.ListMembersRequest{}); err != nil || len(resp.GetMembers()) != 1 || resp.GetCluster() != "other" {
		t.Fatalf("node of another cluster sees %v, %v; want itself alone", resp, err)
	}
	forgedCA, forgedKey := selfSignedCA(t)
	forged := l.credential(name(0), forgedCA, forgedKey)
	failed := l.credential(failedNode, l.ca, l.caKey)
	nocluster := l.credential(noclusterNode, l.ca, l.caKey)
	gone := l.credential(deletedNode, l.ca, l.caKey)
	for what, c := range map[string]struct {
		cert *tls.Certificate
		code codes.Code
	}{
		"no credential":            {nil, codes.Unauthenticated},
		"credential of another CA": {&forged, codes.Unauthenticated},
		"node that failed":         {&failed, codes.PermissionDenied},
		"node without cluster":     {&nocluster, codes.PermissionDenied},
		"node without record":      {&gone, codes.PermissionDenied},
	} {
		if _, err := l.client(c.cert).ListMembers(ctx, &pb.ListMembersRequest{}); status.Code(err) != c.code {
			t.Errorf("%s: ListMembers = %v, want %s", what, err, c.code)
		}
	}
}

func selfSignedCA(t *testing.T) (*x509.Certificate, crypto.Signer) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "sovra node CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(der)
	return ca, key
}
