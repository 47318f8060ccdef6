package kms

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	kmsapi "github.com/siderolabs/kms-client/api/kms"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/custody"
)

// memStore is a Store in memory: the cache and the API are the same map.
type memStore struct {
	mu     sync.Mutex // guards nodes, rv and events
	nodes  map[string]*v1alpha1.SovraNode
	rv     int
	events []string
}

func newMemStore() *memStore { return &memStore{nodes: map[string]*v1alpha1.SovraNode{}} }

func (m *memStore) bump(n *v1alpha1.SovraNode) {
	m.rv++
	n.ResourceVersion = strconv.Itoa(m.rv)
}

func (m *memStore) ByUUID(uuid string) []*v1alpha1.SovraNode {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []*v1alpha1.SovraNode
	for _, n := range m.nodes {
		if strings.EqualFold(n.Spec.UUID, uuid) {
			out = append(out, n.DeepCopy())
		}
	}
	return out
}

func (m *memStore) List() []*v1alpha1.SovraNode {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []*v1alpha1.SovraNode
	for _, n := range m.nodes {
		out = append(out, n.DeepCopy())
	}
	return out
}

func (m *memStore) Node(name string) *v1alpha1.SovraNode {
	m.mu.Lock()
	defer m.mu.Unlock()
	if n, ok := m.nodes[name]; ok {
		return n.DeepCopy()
	}
	return nil
}

func (m *memStore) Get(_ context.Context, name string) (*v1alpha1.SovraNode, error) {
	if n := m.Node(name); n != nil {
		return n, nil
	}
	return nil, errNotFound
}

func (m *memStore) Create(_ context.Context, n *v1alpha1.SovraNode) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.nodes[n.Name]; ok {
		return errExists
	}
	n.UID = types.UID(n.Name + time.Now().String())
	n.CreationTimestamp = metav1.Now()
	m.bump(n)
	m.nodes[n.Name] = n.DeepCopy()
	return nil
}

func (m *memStore) UpdateStatus(_ context.Context, n *v1alpha1.SovraNode) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	cur, ok := m.nodes[n.Name]
	switch {
	case !ok:
		return errNotFound
	case cur.ResourceVersion != n.ResourceVersion:
		return errConflict
	}
	cur.Status = *n.Status.DeepCopy()
	m.bump(cur)
	n.ResourceVersion = cur.ResourceVersion
	return nil
}

func (m *memStore) Annotate(_ context.Context, name string, set map[string]*string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	cur, ok := m.nodes[name]
	if !ok {
		return errNotFound
	}
	if cur.Annotations == nil {
		cur.Annotations = map[string]string{}
	}
	for k, v := range set {
		if v == nil {
			delete(cur.Annotations, k)
		} else {
			cur.Annotations[k] = *v
		}
	}
	m.bump(cur)
	return nil
}

func (m *memStore) Delete(_ context.Context, n *v1alpha1.SovraNode) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.nodes, n.Name)
	return nil
}

func (m *memStore) Event(_ context.Context, ref *v1alpha1.SovraNode, _ bool, reason, message string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.events = append(m.events, ref.Name+" "+reason+" "+message)
	return nil
}

func (m *memStore) put(n *v1alpha1.SovraNode) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.bump(n)
	m.nodes[n.Name] = n.DeepCopy()
}

// fakeClock is a settable clock.
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

const uuidA, uuidB = "4c4c4544-0042-3510-8052-b4c04f4e3332", "4c4c4544-0042-3510-8052-b4c04f4e3333"

func attested(name, uuid string, at time.Time, addrs ...string) *v1alpha1.SovraNode {
	n := &v1alpha1.SovraNode{ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: v1alpha1.SovraNodeSpec{EKHash: strings.Repeat("a", 64), UUID: uuid, Addresses: addrs}}
	t := metav1.NewTime(at)
	for _, c := range []string{v1alpha1.ConditionEnrolled, v1alpha1.ConditionAttested} {
		meta.SetStatusCondition(&n.Status.Conditions, metav1.Condition{Type: c, Status: metav1.ConditionTrue, Reason: "Test", LastTransitionTime: t})
	}
	n.Status.LastAttestationResult, n.Status.LastAttestationTime = v1alpha1.ResultPassed, &t
	return n
}

func fixture(t *testing.T, cfg Config) (*Service, *memStore, *fakeClock) {
	t.Helper()
	k, err := custody.NewKeyring(map[uint32][]byte{1: bytes.Repeat([]byte{9}, 32)})
	if err != nil {
		t.Fatal(err)
	}
	st := newMemStore()
	clk := &fakeClock{now: time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)}
	s, err := NewWithStore(cfg, st, k, clk, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	return s, st, clk
}

func from(addr string, xff ...string) context.Context {
	ctx := peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{IP: net.ParseIP(addr), Port: 40000}})
	if len(xff) > 0 {
		ctx = metadata.NewIncomingContext(ctx, metadata.Pairs(forwardedHeader, strings.Join(xff, ", ")))
	}
	return ctx
}

func TestSealUnsealDecisions(t *testing.T) {
	s, st, clk := fixture(t, Config{AttestDeadline: time.Minute})
	st.put(attested("ek-a", uuidA, clk.Now().Add(-time.Hour), "10.0.0.1"))
	st.put(attested("ek-b", uuidB, clk.Now().Add(-time.Hour), "10.0.0.2"))
	ctx := from("10.0.0.1")
	secret := bytes.Repeat([]byte{7}, 32)
	sealed, err := s.Seal(ctx, &kmsapi.Request{NodeUuid: uuidA, Data: secret})
	if err != nil {
		t.Fatal(err)
	}
	got, err := s.Unseal(ctx, &kmsapi.Request{NodeUuid: uuidA, Data: sealed.Data})
	if err != nil || !bytes.Equal(got.Data, secret) {
		t.Fatalf("Unseal: %v", err)
	}
	if _, err := s.Seal(ctx, &kmsapi.Request{NodeUuid: uuidB, Data: secret}); err != nil {
		t.Fatal(err)
	}
	denied := func(name, uuid string, blob []byte) {
		t.Helper()
		resp, err := s.Unseal(ctx, &kmsapi.Request{NodeUuid: uuid, Data: blob})
		if resp != nil || status.Code(err) != codes.PermissionDenied || status.Convert(err).Message() != "permission denied" {
			t.Fatalf("%s: %v", name, err)
		}
	}
	denied("A's blob as B", uuidB, sealed.Data)
	denied("unknown", "4c4c4544-0000-0000-0000-000000000000", sealed.Data)
	denied("truncated", uuidA, sealed.Data[:20])
	denied("not a UUID", "../../etc/passwd", sealed.Data)

	// Unsealed and never attested again: quarantined after the deadline.
	clk.Advance(2 * time.Minute)
	s.writeOnce(context.Background(), st)
	s.SweepOnce(context.Background(), st)
	if !quarantined(st.Node("ek-a")) {
		t.Fatal("not quarantined after the deadline")
	}
	denied("quarantined", uuidA, sealed.Data)
	// An operator clears it.
	yes := "yes"
	if err := st.Annotate(context.Background(), "ek-a", map[string]*string{AnnotationClearQuarantine: &yes}); err != nil {
		t.Fatal(err)
	}
	s.SweepOnce(context.Background(), st)
	if quarantined(st.Node("ek-a")) {
		t.Fatal("quarantine not cleared")
	}
	if _, err := s.Unseal(ctx, &kmsapi.Request{NodeUuid: uuidA, Data: sealed.Data}); err != nil {
		t.Fatalf("after clearance: %v", err)
	}
}

func TestAttestationAfterUnseal(t *testing.T) {
	s, st, clk := fixture(t, Config{AttestDeadline: time.Minute})
	st.put(attested("ek-a", uuidA, clk.Now().Add(-time.Hour)))
	ctx := from("10.0.0.1")
	sealed, err := s.Seal(ctx, &kmsapi.Request{NodeUuid: uuidA, Data: make([]byte, 32)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Unseal(ctx, &kmsapi.Request{NodeUuid: uuidA, Data: sealed.Data}); err != nil {
		t.Fatal(err)
	}
	s.writeOnce(context.Background(), st)
	// It attests (passing) 10 s later: the deadline is met and forgotten.
	clk.Advance(10 * time.Second)
	n := st.Node("ek-a")
	at := metav1.NewTime(clk.Now())
	n.Status.LastAttestationTime = &at
	st.put(n)
	s.SweepOnce(context.Background(), st)
	if _, ok := st.Node("ek-a").Annotations[AnnotationReleasedAt]; ok {
		t.Fatal("deadline kept after a passing attestation")
	}
	clk.Advance(time.Hour)
	s.SweepOnce(context.Background(), st)
	if quarantined(st.Node("ek-a")) {
		t.Fatal("quarantined though it attested in time")
	}
	// Next boot: it unseals, then fails attestation: quarantined at once.
	if _, err := s.Unseal(ctx, &kmsapi.Request{NodeUuid: uuidA, Data: sealed.Data}); err != nil {
		t.Fatal(err)
	}
	s.writeOnce(context.Background(), st)
	clk.Advance(5 * time.Second)
	n = st.Node("ek-a")
	at = metav1.NewTime(clk.Now())
	n.Status.LastAttestationTime, n.Status.LastAttestationResult = &at, v1alpha1.ResultFailed
	st.put(n)
	s.SweepOnce(context.Background(), st)
	if c := meta.FindStatusCondition(st.Node("ek-a").Status.Conditions, ConditionQuarantined); c == nil || c.Reason != ReasonFailedAfterUnseal {
		t.Fatalf("quarantine condition: %+v", c)
	}
}

func TestPick(t *testing.T) {
	salted := func(n *v1alpha1.SovraNode) *v1alpha1.SovraNode { n.Status.KeySalt = make([]byte, 32); return n }
	lab := func(n *v1alpha1.SovraNode) *v1alpha1.SovraNode {
		n.Labels = map[string]string{LabelLabPending: "true"}
		return n
	}
	rec := func(name string) *v1alpha1.SovraNode {
		return &v1alpha1.SovraNode{ObjectMeta: metav1.ObjectMeta{Name: name}}
	}
	for _, tc := range []struct {
		name  string
		cands []*v1alpha1.SovraNode
		want  string
	}{
		{"one", []*v1alpha1.SovraNode{rec("a")}, "a"},
		{"the salted one wins over a claimant", []*v1alpha1.SovraNode{rec("rogue"), salted(rec("a"))}, "a"},
		{"two salted: ambiguous", []*v1alpha1.SovraNode{salted(rec("a")), salted(rec("b"))}, ""},
		{"lab and enrolled, both salted (adoption)", []*v1alpha1.SovraNode{salted(lab(rec("lab"))), salted(rec("a"))}, "a"},
		{"lab salted, enrolled not yet", []*v1alpha1.SovraNode{salted(lab(rec("lab"))), rec("a")}, "lab"},
		{"two unsalted: ambiguous", []*v1alpha1.SovraNode{rec("a"), rec("b")}, ""},
		{"unsalted lab and enrolled", []*v1alpha1.SovraNode{lab(rec("lab")), rec("a")}, "a"},
	} {
		got, ok := pick(tc.cands)
		if (tc.want == "") == ok || (ok && got.Name != tc.want) {
			t.Errorf("%s: got %v %v", tc.name, got, ok)
		}
	}
}

func TestCallSource(t *testing.T) {
	trusted := []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}
	for _, tc := range []struct {
		name, peer string
		xff        []string
		want       string
		ignored    bool
	}{
		{"no header", "192.0.2.1", nil, "192.0.2.1", false},
		{"forged header from an untrusted peer", "192.0.2.1", []string{"10.0.0.5"}, "192.0.2.1", true},
		{"trusted proxy", "10.1.0.1", []string{"192.0.2.7"}, "192.0.2.7", false},
		{"client prepends a forged hop", "10.1.0.1", []string{"10.0.0.5, 192.0.2.7"}, "192.0.2.7", false},
		{"chain of trusted proxies", "10.1.0.1", []string{"192.0.2.7, 10.1.0.9"}, "192.0.2.7", false},
		{"garbage hop ends the chain", "10.1.0.1", []string{"192.0.2.7, junk, 192.0.2.8"}, "192.0.2.8", false},
	} {
		s := callSource(from(tc.peer, tc.xff...), trusted)
		if s.Addr.String() != tc.want || s.IgnoredHeader != tc.ignored {
			t.Errorf("%s: got %v (ignored %v)", tc.name, s.Addr, s.IgnoredHeader)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	err := Config{AttestDeadline: -1, NodeRate: -1}.Validate()
	if err == nil || !strings.Contains(err.Error(), "deadline") || !strings.Contains(err.Error(), "rate") {
		t.Fatalf("Validate = %v", err)
	}
	if _, err := ParseTrustedProxies([]string{"10.0.0.0/8", "192.0.2.1", "nope"}); err == nil {
		t.Fatal("bad proxy accepted")
	}
}
