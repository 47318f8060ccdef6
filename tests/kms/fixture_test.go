package kms

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	kmsapi "github.com/siderolabs/kms-client/api/kms"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/attestation"
	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/sovradtest"
)

// The attacker of the stories is on the node network with no credential:
// it knows a node's UUID and record name (neither is secret) and calls from
// an address of its own (127.0.0.2 or 127.0.0.3; the node is 127.0.0.1).
const (
	attackerAddr = "127.0.0.2"
	elsewhere    = "127.0.0.3"
)

const (
	// talosTimeout is the deadline Talos gives every KMS call.
	talosTimeout = 10 * time.Second
	// converge bounds waits for the KMS's cache to see a record change.
	converge = 20 * time.Second
)

// kmsDaemon is a running sovrad with its KMS.
type kmsDaemon struct {
	*sovradtest.Daemon
	t         testing.TB
	KMSAddr   string
	KeyFile   string
	roots     *x509.CertPool
	kube      client.Client
	localAddr string // source address of calls; empty: the kernel's choice
}

// startKMS starts sovrad with the KMS on the node API's port, as in the
// default deployment; the master keyring is outside the data directory.
func startKMS(t testing.TB, extra ...string) *kmsDaemon {
	t.Helper()
	dataDir := filepath.Join(t.TempDir(), "data")
	keyFile := filepath.Join(t.TempDir(), "secrets", "master.key")
	return startKMSWith(t, dataDir, keyFile, testutil.FreePort(t), extra...)
}

// startKMSApart starts sovrad with the KMS on a listener of its own
// (--kms-listen) and no node API.
func startKMSApart(t testing.TB, extra ...string) *kmsDaemon {
	t.Helper()
	addr := "127.0.0.1:" + strconv.Itoa(testutil.FreePort(t))
	keyFile := filepath.Join(t.TempDir(), "secrets", "master.key")
	args := append([]string{"--master-key-file", keyFile, "--kms-listen", addr, "--node-listen=", "--controllers", "none"}, extra...)
	d := sovradtest.Start(t, filepath.Join(t.TempDir(), "data"), args...)
	k := &kmsDaemon{Daemon: d, t: t, KMSAddr: addr, KeyFile: keyFile}
	k.connect()
	return k
}

func startKMSWith(t testing.TB, dataDir, keyFile string, port int, extra ...string) *kmsDaemon {
	t.Helper()
	addr := "127.0.0.1:" + strconv.Itoa(port)
	args := append([]string{"--master-key-file", keyFile, "--node-listen", addr, "--controllers", "none"}, extra...)
	d := sovradtest.Start(t, dataDir, args...)
	k := &kmsDaemon{Daemon: d, t: t, KMSAddr: addr, KeyFile: keyFile}
	k.connect()
	return k
}

func (k *kmsDaemon) connect() {
	t := k.t
	t.Helper()
	ca, err := os.ReadFile(filepath.Join(k.DataDir, "node-ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	k.roots = x509.NewCertPool()
	k.roots.AppendCertsFromPEM(ca)
	cfg, err := clientcmd.BuildConfigFromFlags("", k.Kubeconfig())
	if err != nil {
		t.Fatal(err)
	}
	cfg.QPS, cfg.Burst = 500, 1000
	cfg.ContentType = runtime.ContentTypeJSON
	scheme, err := attestation.Scheme()
	if err != nil {
		t.Fatal(err)
	}
	if k.kube, err = client.New(cfg, client.Options{Scheme: scheme}); err != nil {
		t.Fatal(err)
	}
	// The KMS answers Unavailable until its node cache has synced.
	deadline := time.Now().Add(60 * time.Second)
	for {
		_, err := k.Unseal(context.Background(), "00000000-0000-0000-0000-000000000000", []byte{1})
		if status.Code(err) == codes.PermissionDenied {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("KMS not ready: %v\n%s", err, k.Tail(30))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// dial connects as Talos does (internal/pkg/encryption/keys/kms.go): a fresh
// grpc.NewClient per call, TLS with the platform's roots (here the sovra CA),
// no client certificate, a shared write buffer.
func (k *kmsDaemon) dial(opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	opts = append([]grpc.DialOption{
		grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: k.roots})),
		grpc.WithSharedWriteBuffer(true),
	}, opts...)
	if k.localAddr != "" {
		local := &net.TCPAddr{IP: net.ParseIP(k.localAddr)}
		opts = append(opts, grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{LocalAddr: local}).DialContext(ctx, "tcp", addr)
		}))
	}
	return grpc.NewClient(k.KMSAddr, opts...)
}

// Seal calls Seal as Talos does when it formats a volume.
func (k *kmsDaemon) Seal(ctx context.Context, uuid string, data []byte) ([]byte, error) {
	return k.call(ctx, true, uuid, data)
}

// Unseal calls Unseal as Talos does on every boot.
func (k *kmsDaemon) Unseal(ctx context.Context, uuid string, blob []byte) ([]byte, error) {
	return k.call(ctx, false, uuid, blob)
}

func (k *kmsDaemon) call(ctx context.Context, seal bool, uuid string, data []byte) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, talosTimeout)
	defer cancel()
	conn, err := k.dial()
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

// forwarded returns ctx with an X-Forwarded-For header.
func forwarded(ctx context.Context, addr string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "x-forwarded-for", addr)
}

// node is a test node: its record name, SMBIOS UUID and EK hash (empty
// for a node that enrolls for real).
type node struct{ Name, UUID, EKHash string }

func newNode(t testing.TB) node {
	t.Helper()
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	h := hex.EncodeToString(b)
	uuid := h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
	ek := sha256.Sum256(b)
	return node{Name: attestation.NodeName(hex.EncodeToString(ek[:])), UUID: uuid, EKHash: hex.EncodeToString(ek[:])}
}

// nodeState is the trust state a test gives a record, as the attestation
// service would have written it.
type nodeState struct {
	Enrolled, Attested bool
	Result             string // Passed or Failed; empty: never attested
	Addresses          []string
	AttestedAt         time.Time
	// Boot, when set, is the boot the attestation reported, started at
	// BootStarted (zero: a minute before the attestation).
	Boot        string
	BootStarted time.Time
}

var attestedNode = nodeState{Enrolled: true, Attested: true, Result: v1alpha1.ResultPassed, Addresses: []string{"127.0.0.1"}, Boot: "boot-1"}

// createNode creates n's record with state st, as enrollment (and the
// attestation that followed) would.
func (k *kmsDaemon) createNode(ctx context.Context, n node, st nodeState) error {
	rec := &v1alpha1.SovraNode{
		ObjectMeta: metav1.ObjectMeta{Name: n.Name},
		Spec: v1alpha1.SovraNodeSpec{
			EKHash: n.EKHash, EKPublic: []byte("ek"), AKPublic: []byte("ak"),
			UUID: n.UUID, Hostname: "host-" + n.UUID[:8], Addresses: st.Addresses,
		},
	}
	if err := k.kube.Create(ctx, rec); err != nil {
		return fmt.Errorf("creating record %s: %w", n.Name, err)
	}
	setState(rec, st)
	if err := k.kube.Status().Update(ctx, rec); err != nil {
		return fmt.Errorf("writing status of %s: %w", n.Name, err)
	}
	return nil
}

func setState(rec *v1alpha1.SovraNode, st nodeState) {
	now := metav1.Now()
	if !st.AttestedAt.IsZero() {
		now = metav1.NewTime(st.AttestedAt)
	}
	cond := func(typ string, on bool, reason string) {
		s := metav1.ConditionFalse
		if on {
			s = metav1.ConditionTrue
		}
		meta.SetStatusCondition(&rec.Status.Conditions, metav1.Condition{Type: typ, Status: s, Reason: reason, LastTransitionTime: now})
	}
	cond(v1alpha1.ConditionEnrolled, st.Enrolled, v1alpha1.ReasonActivated)
	if st.Result != "" {
		reason := v1alpha1.ReasonAttestationPassed
		if st.Result != v1alpha1.ResultPassed {
			reason = v1alpha1.ReasonPolicyViolation
		}
		cond(v1alpha1.ConditionAttested, st.Attested, reason)
		rec.Status.LastAttestationResult = st.Result
		rec.Status.LastAttestationTime = &now
		rec.Status.Reason = reason
		if st.Boot != "" {
			started := st.BootStarted
			if started.IsZero() {
				started = now.Add(-time.Minute)
			}
			boot := v1alpha1.Boot{ID: st.Boot, Started: metav1.NewTime(started), FirstAttested: now, LastAttested: now, Result: st.Result}
			boots := []v1alpha1.Boot{boot}
			for _, b := range rec.Status.Boots {
				if b.ID != st.Boot {
					boots = append(boots, b)
				}
			}
			rec.Status.Boots = boots
		}
	} else {
		cond(v1alpha1.ConditionAttested, false, v1alpha1.ReasonNotAttested)
	}
}

// setNodeState rewrites the trust state of n's record, as a new attestation would.
func (k *kmsDaemon) setNodeState(ctx context.Context, n node, st nodeState) {
	k.t.Helper()
	for {
		var rec v1alpha1.SovraNode
		if err := k.kube.Get(ctx, client.ObjectKey{Name: n.Name}, &rec); err != nil {
			k.t.Fatal(err)
		}
		setState(&rec, st)
		err := k.kube.Status().Update(ctx, &rec)
		if err == nil {
			return
		}
		if !strings.Contains(err.Error(), "modified") {
			k.t.Fatal(err)
		}
	}
}

func (k *kmsDaemon) getNode(ctx context.Context, n node) *v1alpha1.SovraNode {
	k.t.Helper()
	var rec v1alpha1.SovraNode
	if err := k.kube.Get(ctx, client.ObjectKey{Name: n.Name}, &rec); err != nil {
		k.t.Fatal(err)
	}
	return &rec
}

// sealEventually seals data for n, retrying while the KMS's cache has not
// seen n's new record (a fresh record takes milliseconds to arrive).
func (k *kmsDaemon) sealEventually(ctx context.Context, n node, data []byte) []byte {
	k.t.Helper()
	var err error
	deadline := time.Now().Add(converge)
	for time.Now().Before(deadline) {
		var blob []byte
		if blob, err = k.Seal(ctx, n.UUID, data); err == nil {
			return blob
		}
		time.Sleep(50 * time.Millisecond)
	}
	k.t.Fatalf("sealing for %s: %v\n%s", n.Name, err, k.Tail(20))
	return nil
}

// unsealEventually waits until an Unseal of blob for n succeeds.
func (k *kmsDaemon) unsealEventually(ctx context.Context, n node, blob []byte) []byte {
	k.t.Helper()
	var err error
	deadline := time.Now().Add(converge)
	for time.Now().Before(deadline) {
		var data []byte
		if data, err = k.Unseal(ctx, n.UUID, blob); err == nil {
			return data
		}
		time.Sleep(50 * time.Millisecond)
	}
	k.t.Fatalf("unsealing for %s: %v\n%s", n.Name, err, k.Tail(20))
	return nil
}

// deniedEventually waits until an Unseal of blob for n is denied (the
// KMS's cache follows record changes within milliseconds).
func (k *kmsDaemon) deniedEventually(ctx context.Context, n node, blob []byte) {
	k.t.Helper()
	deadline := time.Now().Add(converge)
	for {
		data, err := k.Unseal(ctx, n.UUID, blob)
		if err != nil {
			requireDenied(k.t, data, err)
			return
		}
		if time.Now().After(deadline) {
			k.t.Fatalf("Unseal for %s still allowed", n.Name)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// requireDenied checks the uniform denial: PermissionDenied, no data, and
// nothing but "permission denied" in the message.
func requireDenied(t testing.TB, data []byte, err error) {
	t.Helper()
	if data != nil {
		t.Fatalf("denied call returned %d bytes", len(data))
	}
	st, ok := status.FromError(err)
	if !ok || st.Code() != codes.PermissionDenied {
		t.Fatalf("want PermissionDenied, got %v", err)
	}
	if st.Message() != "permission denied" || len(st.Details()) != 0 {
		t.Fatalf("denial leaks detail: %q %v", st.Message(), st.Details())
	}
}

// key returns 32 random bytes, as Talos seals.
func key(t testing.TB) []byte {
	t.Helper()
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// encodings are the forms a secret could take in a file or a log.
func encodings(secret []byte) map[string][]byte {
	return map[string][]byte{
		"raw":       secret,
		"hex":       []byte(hex.EncodeToString(secret)),
		"HEX":       []byte(strings.ToUpper(hex.EncodeToString(secret))),
		"base64":    []byte(base64.StdEncoding.EncodeToString(secret)),
		"base64url": []byte(base64.RawURLEncoding.EncodeToString(secret)),
		"base64raw": []byte(base64.RawStdEncoding.EncodeToString(secret)),
	}
}

// findSecret reports the first encoding of secret found in haystack.
func findSecret(haystack, secret []byte) (string, bool) {
	for name, enc := range encodings(secret) {
		if bytes.Contains(haystack, enc) {
			return name, true
		}
	}
	return "", false
}

// errIs is errors.Is for status codes.
func codeOf(err error) codes.Code {
	var s interface{ GRPCStatus() *status.Status }
	if errors.As(err, &s) {
		return s.GRPCStatus().Code()
	}
	return status.Code(err)
}

// from returns the daemon as reached from source address addr (an address
// of this host, e.g. 127.0.0.2).
func (k *kmsDaemon) from(addr string) *kmsDaemon {
	c := *k
	c.localAddr = addr
	return &c
}

// ledger returns the entries of every replica's ledger about n.
func (k *kmsDaemon) ledger(ctx context.Context, n node) []v1alpha1.LedgerEntry {
	k.t.Helper()
	var list v1alpha1.UnsealLedgerList
	if err := k.kube.List(ctx, &list); err != nil {
		k.t.Fatal(err)
	}
	var out []v1alpha1.LedgerEntry
	for _, l := range list.Items {
		for _, e := range l.Spec.Entries {
			if e.Node == n.Name {
				out = append(out, e)
			}
		}
	}
	return out
}

// waitLedger waits until n's ledger holds an entry from source with the
// verdict (empty: any), and returns it.
func (k *kmsDaemon) waitLedger(ctx context.Context, n node, source, verdict string) v1alpha1.LedgerEntry {
	k.t.Helper()
	deadline := time.Now().Add(converge)
	for {
		entries := k.ledger(ctx, n)
		for _, e := range entries {
			if e.Source == source && (verdict == "" || e.Verdict == verdict) {
				return e
			}
		}
		if time.Now().After(deadline) {
			k.t.Fatalf("no ledger entry of %s from %s with verdict %q: %+v\n%s", n.Name, source, verdict, entries, k.Tail(20))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitCondition waits until n's record has condition typ True (or, with
// on false, not True).
func (k *kmsDaemon) waitCondition(ctx context.Context, n node, typ string, on bool) *v1alpha1.SovraNode {
	k.t.Helper()
	deadline := time.Now().Add(converge)
	for {
		rec := k.getNode(ctx, n)
		if meta.IsStatusConditionTrue(rec.Status.Conditions, typ) == on {
			return rec
		}
		if time.Now().After(deadline) {
			k.t.Fatalf("condition %s of %s never became %v: %+v\n%s", typ, n.Name, on, rec.Status.Conditions, k.Tail(20))
		}
		time.Sleep(200 * time.Millisecond)
	}
}
