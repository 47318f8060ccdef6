package kms

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"slices"
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

// memStore is a Store in memory: the cache and the API are the same maps.
type memStore struct {
	mu      sync.Mutex // guards every field
	nodes   map[string]*v1alpha1.SovraNode
	claims  map[string]*v1alpha1.UUIDClaim
	ledgers map[string]*v1alpha1.UnsealLedger
	rv      int
	events  []string
}

func newMemStore() *memStore {
	return &memStore{nodes: map[string]*v1alpha1.SovraNode{}, claims: map[string]*v1alpha1.UUIDClaim{},
		ledgers: map[string]*v1alpha1.UnsealLedger{}}
}

func (m *memStore) bump(o metav1.Object) {
	m.rv++
	o.SetResourceVersion(strconv.Itoa(m.rv))
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

func (m *memStore) Claim(uuid string) *v1alpha1.UUIDClaim {
	m.mu.Lock()
	defer m.mu.Unlock()
	if c, ok := m.claims[uuid]; ok {
		return c.DeepCopy()
	}
	return nil
}

func (m *memStore) Ledgers() []*v1alpha1.UnsealLedger {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []*v1alpha1.UnsealLedger
	for _, l := range m.ledgers {
		out = append(out, l.DeepCopy())
	}
	return out
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
	n.UID = types.UID(n.Name + "-" + strconv.Itoa(m.rv))
	if n.CreationTimestamp.IsZero() {
		n.CreationTimestamp = metav1.Now()
	}
	m.bump(n)
	m.nodes[n.Name] = n.DeepCopy()
	return nil
}

func (m *memStore) write(n *v1alpha1.SovraNode, apply func(cur *v1alpha1.SovraNode)) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	cur, ok := m.nodes[n.Name]
	switch {
	case !ok:
		return errNotFound
	case cur.ResourceVersion != n.ResourceVersion:
		return errConflict
	}
	apply(cur)
	m.bump(cur)
	n.ResourceVersion = cur.ResourceVersion
	return nil
}

func (m *memStore) Update(_ context.Context, n *v1alpha1.SovraNode) error {
	return m.write(n, func(cur *v1alpha1.SovraNode) {
		cur.Spec, cur.Labels, cur.Annotations, cur.Finalizers = *n.Spec.DeepCopy(), n.Labels, n.Annotations, n.Finalizers
	})
}

func (m *memStore) UpdateStatus(_ context.Context, n *v1alpha1.SovraNode) error {
	return m.write(n, func(cur *v1alpha1.SovraNode) { cur.Status = *n.Status.DeepCopy() })
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

func (m *memStore) CreateClaim(_ context.Context, c *v1alpha1.UUIDClaim) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.claims[c.Name]; ok {
		return errExists
	}
	m.claims[c.Name] = c.DeepCopy()
	return nil
}

func (m *memStore) UpdateClaim(_ context.Context, c *v1alpha1.UUIDClaim) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.claims[c.Name] = c.DeepCopy()
	return nil
}

func (m *memStore) OwnLedgers(_ context.Context, replica string) ([]v1alpha1.UnsealLedger, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []v1alpha1.UnsealLedger
	for _, l := range m.ledgers {
		if l.Spec.Replica == replica {
			out = append(out, *l.DeepCopy())
		}
	}
	return out, nil
}

func (m *memStore) SaveLedger(_ context.Context, l *v1alpha1.UnsealLedger) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	cur, ok := m.ledgers[l.Name]
	if (l.ResourceVersion == "") == ok || (ok && cur.ResourceVersion != l.ResourceVersion) {
		return errConflict
	}
	m.bump(l)
	m.ledgers[l.Name] = l.DeepCopy()
	return nil
}

func (m *memStore) DeleteLedger(_ context.Context, l *v1alpha1.UnsealLedger) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.ledgers, l.Name)
	return nil
}

func (m *memStore) Event(ref *v1alpha1.SovraNode, _ bool, reason, message string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.events = append(m.events, ref.Name+" "+reason+" "+message)
}

func (m *memStore) Refused(ref *v1alpha1.SovraNode, reason, message string) {
	m.Event(ref, true, reason, message)
}

func (m *memStore) eventsOf(reason string) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []string
	for _, e := range m.events {
		if strings.Contains(e, " "+reason+" ") {
			out = append(out, e)
		}
	}
	return out
}

func (m *memStore) put(n *v1alpha1.SovraNode) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if n.UID == "" {
		n.UID = types.UID(n.Name + "-uid")
	}
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
	n := &v1alpha1.SovraNode{ObjectMeta: metav1.ObjectMeta{Name: name, CreationTimestamp: metav1.NewTime(at)},
		Spec: v1alpha1.SovraNodeSpec{EKHash: strings.Repeat("a", 64), UUID: uuid, Addresses: addrs}}
	t := metav1.NewTime(at)
	for _, c := range []string{v1alpha1.ConditionEnrolled, v1alpha1.ConditionAttested} {
		meta.SetStatusCondition(&n.Status.Conditions, metav1.Condition{Type: c, Status: metav1.ConditionTrue, Reason: "Test", LastTransitionTime: t})
	}
	n.Status.LastAttestationResult, n.Status.LastAttestationTime = v1alpha1.ResultPassed, &t
	return n
}

// booted records that n reported boot id, started at started, with result.
func booted(st *memStore, name, id string, started time.Time, result string) {
	n := st.Node(name)
	b := v1alpha1.Boot{ID: id, Started: metav1.NewTime(started), Result: result}
	if result == v1alpha1.ResultPassed {
		b.Passed = &b.Started
	}
	n.Status.Boots = append([]v1alpha1.Boot{b}, n.Status.Boots...)
	n.Status.LastAttestationResult = result
	st.put(n)
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

func requireDenied(t *testing.T, what string, resp *kmsapi.Response, err error) {
	t.Helper()
	if resp != nil || status.Code(err) != codes.PermissionDenied || status.Convert(err).Message() != "permission denied" {
		t.Fatalf("%s: %v, want the uniform denial", what, err)
	}
}

func TestSealUnsealDecisions(t *testing.T) {
	s, st, clk := fixture(t, Config{AttestDeadline: time.Minute})
	st.put(attested("ek-a", uuidA, clk.Now(), "10.0.0.1"))
	st.put(attested("ek-b", uuidB, clk.Now(), "10.0.0.2"))
	ctx := from("10.0.0.1")
	secret := bytes.Repeat([]byte{7}, 32)
	sealed, err := s.Seal(ctx, &kmsapi.Request{NodeUuid: uuidA, Data: secret})
	if err != nil {
		t.Fatal(err)
	}
	rec := st.Node("ek-a")
	if len(rec.Status.KeySalt) != 32 || !slices.Contains(rec.Finalizers, v1alpha1.FinalizerShred) ||
		rec.Status.Sealing == nil || len(rec.Status.Sealing.Recent) != 1 || rec.Status.Sealing.Recent[0].Blob != fingerprint(sealed.Data) {
		t.Fatalf("record after the Seal: finalizers %v, sealing %+v", rec.Finalizers, rec.Status.Sealing)
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
		requireDenied(t, name, resp, err)
	}
	denied("A's blob as B", uuidB, sealed.Data)
	denied("unknown", "4c4c4544-0000-0000-0000-000000000000", sealed.Data)
	denied("truncated", uuidA, sealed.Data[:20])
	denied("not a UUID", "../../etc/passwd", sealed.Data)

	n := st.Node("ek-a")
	setQuarantine(n, true, ReasonFailedAfterUnseal, "test", clk.Now())
	st.put(n)
	denied("quarantined", uuidA, sealed.Data)
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

// TestSealingWindows: a record seals in its first window; afterwards a Seal
// is answered as for an unknown UUID, and changes nothing, until an operator
// opens a window, which expires.
func TestSealingWindows(t *testing.T) {
	s, st, clk := fixture(t, Config{SealWindow: time.Hour})
	st.put(attested("ek-a", uuidA, clk.Now(), "10.0.0.1"))
	ctx := from("10.0.0.1")
	seal := func() (*kmsapi.Response, error) {
		return s.Seal(ctx, &kmsapi.Request{NodeUuid: uuidA, Data: make([]byte, 32)})
	}
	if _, err := seal(); err != nil {
		t.Fatalf("Seal in the first window: %v", err)
	}
	clk.Advance(FreshSealWindow - time.Second)
	if _, err := seal(); err != nil {
		t.Fatalf("Seal in the install's burst: %v", err)
	}
	// The install is over long before the first window would close.
	clk.Advance(2 * time.Second)
	before := st.Node("ek-a").ResourceVersion
	resp, err := seal()
	requireDenied(t, "Seal after the first window", resp, err)
	unknown, uerr := s.Seal(ctx, &kmsapi.Request{NodeUuid: "4c4c4544-0000-0000-0000-000000000000", Data: make([]byte, 32)})
	requireDenied(t, "Seal for an unknown UUID", unknown, uerr)
	if status.Convert(err).Proto().String() != status.Convert(uerr).Proto().String() {
		t.Fatalf("outside a window %v, unknown UUID %v: the answers differ", err, uerr)
	}
	if st.Node("ek-a").ResourceVersion != before {
		t.Fatal("a refused Seal changed the record")
	}
	for _, tc := range []struct {
		value string
		opens bool
	}{{"soon", false}, {"30m", true}} {
		value, opens := tc.value, tc.opens
		v := value
		if err := st.Annotate(context.Background(), "ek-a", map[string]*string{AnnotationSealingWindow: &v}); err != nil {
			t.Fatal(err)
		}
		s.SweepOnce(context.Background(), st)
		rec := st.Node("ek-a")
		if _, left := rec.Annotations[AnnotationSealingWindow]; left {
			t.Fatalf("%s: annotation left in place", value)
		}
		if _, err := seal(); (err == nil) != opens {
			t.Fatalf("annotation %q: Seal = %v, want opened %v", value, err, opens)
		}
	}
	if w := st.Node("ek-a").Status.Sealing.Window; w == nil || w.Reason != v1alpha1.WindowOperator || len(st.eventsOf("SealingWindowOpened")) != 1 || len(st.eventsOf("SealingWindowRefused")) != 1 {
		t.Fatalf("window %+v, events %v", w, st.events)
	}
	clk.Advance(31 * time.Minute)
	resp, err = seal()
	requireDenied(t, "Seal after the operator's window", resp, err)
}

// TestRateLimitIsPerSource: a flood naming a node's UUID from one source
// does not spend the node's own calls.
func TestRateLimitIsPerSource(t *testing.T) {
	s, st, clk := fixture(t, Config{})
	st.put(attested("ek-a", uuidA, clk.Now(), "10.0.0.1"))
	sealed, err := s.Seal(from("10.0.0.1"), &kmsapi.Request{NodeUuid: uuidA, Data: make([]byte, 32)})
	if err != nil {
		t.Fatal(err)
	}
	limited := 0
	for range 1000 {
		_, err := s.Unseal(from("192.0.2.66"), &kmsapi.Request{NodeUuid: uuidA, Data: sealed.Data})
		if status.Code(err) == codes.ResourceExhausted {
			limited++
		}
	}
	if limited < 900 {
		t.Fatalf("only %d of 1000 flooding calls were limited", limited)
	}
	if _, err := s.Unseal(from("10.0.0.1"), &kmsapi.Request{NodeUuid: uuidA, Data: sealed.Data}); err != nil {
		t.Fatalf("the node's own Unseal during the flood: %v", err)
	}
}

func TestResolveByClaim(t *testing.T) {
	_, st, clk := fixture(t, Config{})
	st.put(attested("ek-a", uuidA, clk.Now()))
	st.put(attested("ek-rogue", uuidA, clk.Now()))
	if resolve(st, uuidA) != nil {
		t.Fatal("two records name the UUID and nobody claims it: resolved anyway")
	}
	a := st.Node("ek-a")
	if err := st.CreateClaim(context.Background(), &v1alpha1.UUIDClaim{ObjectMeta: metav1.ObjectMeta{Name: uuidA},
		Spec: v1alpha1.UUIDClaimSpec{Node: "ek-a", NodeUID: a.UID}}); err != nil {
		t.Fatal(err)
	}
	if r := resolve(st, uuidA); r == nil || r.Name != "ek-a" {
		t.Fatalf("resolved %v, want the claim's record", r)
	}
	st.put(&v1alpha1.SovraNode{ObjectMeta: metav1.ObjectMeta{Name: "ek-a", UID: "another-instance"}})
	if resolve(st, uuidA) != nil {
		t.Fatal("a record re-created under the claim's name inherited the claim")
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
	err := Config{AttestDeadline: -1, SourceRate: -1}.Validate()
	if err == nil || !strings.Contains(err.Error(), "deadline") || !strings.Contains(err.Error(), "rate") {
		t.Fatalf("Validate = %v", err)
	}
	if _, err := ParseTrustedProxies([]string{"10.0.0.0/8", "192.0.2.1", "nope"}); err == nil {
		t.Fatal("bad proxy accepted")
	}
}
