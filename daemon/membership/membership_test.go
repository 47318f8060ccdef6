package membership

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
)

// fakeClock is a settable clock.
type fakeClock struct {
	mu sync.Mutex // guards t
	t  time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }

func (c *fakeClock) Advance(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

// recorder keeps events.
type recorder struct {
	mu     sync.Mutex // guards events
	events []string
}

func (r *recorder) Event(_ context.Context, obj runtime.Object, warning bool, reason, message string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	kind := "Normal"
	if warning {
		kind = "Warning"
	}
	r.events = append(r.events, obj.(metav1.Object).GetName()+" "+kind+" "+reason+": "+message)
}

func (r *recorder) list() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.events...)
}

type harness struct {
	svc    *Service
	client client.Client
	clock  *fakeClock
	events *recorder
}

// node returns an attested SovraNode of cluster (none when empty) with one
// address.
func node(name, cluster, addr string, result string) *v1alpha1.SovraNode {
	n := &v1alpha1.SovraNode{
		ObjectMeta: metav1.ObjectMeta{Name: name, UID: types.UID("uid-" + name), CreationTimestamp: metav1.NewTime(time.Unix(1000, 0))},
		Spec:       v1alpha1.SovraNodeSpec{EKHash: name, Hostname: name + ".lan", Addresses: []string{addr}},
		Status:     v1alpha1.SovraNodeStatus{LastAttestationResult: result},
	}
	if cluster != "" {
		n.Labels = map[string]string{LabelCluster: cluster}
	}
	return n
}

func newHarness(t testing.TB, nodes ...*v1alpha1.SovraNode) harness {
	t.Helper()
	s, err := Scheme()
	if err != nil {
		t.Fatal(err)
	}
	objs := make([]client.Object, 0, len(nodes))
	for _, n := range nodes {
		objs = append(objs, n)
	}
	c := fake.NewClientBuilder().WithScheme(s).WithObjects(objs...).WithStatusSubresource(&v1alpha1.SovraNode{}).Build()
	clk := &fakeClock{t: time.Unix(1_800_000_000, 0)}
	rec := &recorder{}
	return harness{svc: New(Config{LeaseDuration: time.Minute}, c, rec, clk, nil), client: c, clock: clk, events: rec}
}

func id(name string) Identity { return Identity{Node: name, UID: types.UID("uid-" + name)} }

func TestMembersOfCallersClusterOnly(t *testing.T) {
	h := newHarness(t,
		node("ek-a", "prod", "10.0.0.1", v1alpha1.ResultPassed),
		node("ek-b", "prod", "10.0.0.2", v1alpha1.ResultPassed),
		node("ek-c", "prod", "10.0.0.3", v1alpha1.ResultFailed),  // not attested
		node("ek-d", "prod", "10.0.0.4", ""),                     // enrolled, never attested
		node("ek-x", "other", "10.0.0.9", v1alpha1.ResultPassed), // another cluster
		node("ek-n", "", "10.0.0.8", v1alpha1.ResultPassed),      // no cluster
	)
	q := node("ek-q", "prod", "10.0.0.5", v1alpha1.ResultPassed)
	q.Status.Conditions = []metav1.Condition{{Type: v1alpha1.ConditionQuarantined, Status: metav1.ConditionTrue, Reason: "FailedAfterUnseal", LastTransitionTime: metav1.Now()}}
	if err := h.client.Create(context.Background(), q); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()

	cluster, members, err := h.svc.Members(ctx, id("ek-a"), "10.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	if cluster != "prod" || len(members) != 2 || members[0].Node != "ek-a" || members[1].Node != "ek-b" {
		t.Fatalf("Members = %s %+v, want ek-a and ek-b of prod", cluster, members)
	}
	if !members[0].Self || members[1].Self || members[0].Address != "10.0.0.1" || members[1].Address != "" {
		t.Fatalf("members = %+v: want ek-a self with its announced address, ek-b unannounced", members)
	}

	_, members, _ = h.svc.Members(ctx, id("ek-b"), "")
	if members[0].Address != "10.0.0.1" {
		t.Fatalf("announcement not recorded: %+v", members)
	}

	for name, want := range map[string]error{"ek-x": nil, "ek-n": ErrNoCluster, "ek-c": ErrNotAttested, "ek-d": ErrNotAttested, "ek-q": ErrNotAttested, "ek-gone": ErrNotEnrolled} {
		_, members, err := h.svc.Members(ctx, id(name), "")
		if !errors.Is(err, want) {
			t.Errorf("%s: err = %v, want %v", name, err, want)
		}
		if name == "ek-x" && (len(members) != 1 || members[0].Node != "ek-x") {
			t.Errorf("ek-x sees %+v, want itself alone", members)
		}
	}

	if _, _, err := h.svc.Members(ctx, id("ek-a"), "10.0.0.2"); !errors.Is(err, ErrInvalid) {
		t.Fatalf("announcing another node's address: err = %v, want ErrInvalid", err)
	}
}

func TestCredentialOfEarlierRecordRefused(t *testing.T) {
	n := node("ek-a", "prod", "10.0.0.1", v1alpha1.ResultPassed)
	h := newHarness(t, n)
	old := Identity{Node: "ek-a", UID: "uid-of-the-deleted-record"}
	if _, _, err := h.svc.Members(context.Background(), old, ""); !errors.Is(err, ErrNotAttested) {
		t.Fatalf("credential of an earlier record: err = %v, want ErrNotAttested", err)
	}
}

func TestClusterLabelMustBeDNSLabel(t *testing.T) {
	h := newHarness(t, node("ek-a", "Prod_1", "10.0.0.1", v1alpha1.ResultPassed))
	if _, _, err := h.svc.Members(context.Background(), id("ek-a"), ""); !errors.Is(err, ErrNoCluster) {
		t.Fatalf("err = %v, want ErrNoCluster", err)
	}
}
