package hosts

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/record"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/hosts/talosadmin"
)

// fakeTalos records the calls sovrad makes on workers' Talos APIs.
type fakeTalos struct {
	mu     sync.Mutex
	resets []string // the talosconfig of each call, then its addresses
	fail   error
}

func (f *fakeTalos) ApplyConfiguration(context.Context, []byte, talosadmin.Node, []byte) error {
	return errors.New("unexpected apply")
}

func (f *fakeTalos) Reset(_ context.Context, talosconfig []byte, node talosadmin.Node) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.resets = append(f.resets, string(talosconfig)+" "+node.UUID+" "+node.Addresses[0])
	return f.fail
}

func (f *fakeTalos) calls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.resets)
}

type fakeClock struct{ t time.Time }

func (c *fakeClock) Now() time.Time { return c.t }

// releasedHost is a host its machine let go while it ran its configuration,
// with its node's record and its cluster's talosconfig.
func releasedHost(t *testing.T, actor v1alpha1.TalosActor) (client.Client, *record.FakeRecorder) {
	t.Helper()
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	host := &v1alpha1.Host{ObjectMeta: metav1.ObjectMeta{Name: "h1"}, Spec: v1alpha1.HostSpec{Accepted: true},
		Status: v1alpha1.HostStatus{
			Phase: v1alpha1.HostReleasing, Mode: ModeConfigured, Boot: "boot-2", UUID: "uuid-h1", Addresses: []string{"10.0.0.21"},
			Cluster: "prod", Machine: "prod/prod-workers-abc", TalosActor: actor, ReleasedGeneration: 1, RunningGeneration: 1,
		}}
	rec := &v1alpha1.SovraNode{ObjectMeta: metav1.ObjectMeta{Name: "h1"}}
	tc := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "prod", Name: "prod-talosconfig"}, Data: map[string][]byte{"talosconfig": []byte("cluster-talosconfig")}}
	c := fake.NewClientBuilder().WithScheme(scheme).WithStatusSubresource(&v1alpha1.Host{}, &v1alpha1.SovraNode{}).
		WithObjects(host, rec, tc).Build()
	return c, record.NewFakeRecorder(100)
}

func reconcileHost(t *testing.T, r *Reconciler) ctrl.Result {
	t.Helper()
	res, err := r.Reconcile(context.Background(), ctrl.Request{NamespacedName: types.NamespacedName{Name: "h1"}})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func getHost(t *testing.T, c client.Client) *v1alpha1.Host {
	t.Helper()
	var h v1alpha1.Host
	if err := c.Get(context.Background(), client.ObjectKey{Name: "h1"}, &h); err != nil {
		t.Fatal(err)
	}
	return &h
}

// TestDaemonResetsReleasedWorker: a released worker, whose agent holds an
// os:reader certificate, is reset by the reconciler with its cluster's
// talosconfig at its addresses, once: the action and its outcome are in the
// host's status, and a further reconcile calls nothing.
func TestDaemonResetsReleasedWorker(t *testing.T) {
	c, events := releasedHost(t, v1alpha1.TalosActorDaemon)
	talos := &fakeTalos{}
	clock := &fakeClock{t: time.Now()}
	r := &Reconciler{Client: c, Events: events, Logger: zap.NewNop(), Talos: talos, Clock: clock}

	reconcileHost(t, r)
	if talos.calls() != 1 || talos.resets[0] != "cluster-talosconfig uuid-h1 10.0.0.21" {
		t.Fatalf("resets %v, want one with the cluster's talosconfig at the host's address", talos.resets)
	}
	h := getHost(t, c)
	a := h.Status.DaemonAction
	if a == nil || a.Type != v1alpha1.DaemonActionReset || a.Boot != "boot-2" || a.Attempts != 1 || a.Done == nil {
		t.Fatalf("daemon action %+v, want a done Reset of boot-2 after one attempt", a)
	}
	if !meta.IsStatusConditionTrue(h.Status.Conditions, v1alpha1.HostConditionDaemonAction) {
		t.Fatalf("conditions %+v: want DaemonAction True", h.Status.Conditions)
	}

	clock.t = clock.t.Add(time.Hour)
	reconcileHost(t, r)
	if talos.calls() != 1 {
		t.Fatalf("%d resets after a second reconcile, want the one", talos.calls())
	}
}

// TestDaemonResetRetriedWithBackoff: a failed call is a False condition and
// a Warning event, and is retried only after the backoff.
func TestDaemonResetRetriedWithBackoff(t *testing.T) {
	c, events := releasedHost(t, v1alpha1.TalosActorDaemon)
	talos := &fakeTalos{fail: errors.New("Unavailable: connection refused")}
	clock := &fakeClock{t: time.Now()}
	r := &Reconciler{Client: c, Events: events, Logger: zap.NewNop(), Talos: talos, Clock: clock}

	if res := reconcileHost(t, r); res.RequeueAfter != actionBackoff {
		t.Fatalf("requeue after %s, want %s", res.RequeueAfter, actionBackoff)
	}
	h := getHost(t, c)
	if c := meta.FindStatusCondition(h.Status.Conditions, v1alpha1.HostConditionDaemonAction); c == nil || c.Status != metav1.ConditionFalse || c.Reason != ReasonDaemonFailed {
		t.Fatalf("condition %+v, want DaemonAction False %s", c, ReasonDaemonFailed)
	}
	select {
	case e := <-events.Events:
		if e[:7] != "Warning" {
			t.Fatalf("event %q, want a Warning", e)
		}
	default:
		t.Fatal("no event for the failed call")
	}

	reconcileHost(t, r) // within the backoff
	if talos.calls() != 1 {
		t.Fatalf("%d calls within the backoff, want 1", talos.calls())
	}
	clock.t = clock.t.Add(actionBackoff)
	talos.fail = nil
	reconcileHost(t, r)
	if talos.calls() != 2 {
		t.Fatalf("%d calls after the backoff, want 2", talos.calls())
	}
	if a := getHost(t, c).Status.DaemonAction; a == nil || a.Done == nil || a.Attempts != 2 {
		t.Fatalf("daemon action %+v, want done after 2 attempts", a)
	}
}

// TestControlPlaneResetByItsAgent: a released control plane is left to its
// agent (an os:admin certificate of its own CA): sovrad calls nothing.
func TestControlPlaneResetByItsAgent(t *testing.T) {
	c, events := releasedHost(t, v1alpha1.TalosActorAgent)
	talos := &fakeTalos{}
	r := &Reconciler{Client: c, Events: events, Logger: zap.NewNop(), Talos: talos}
	reconcileHost(t, r)
	if talos.calls() != 0 || getHost(t, c).Status.DaemonAction != nil {
		t.Fatalf("sovrad acted on a control plane: %d calls, action %+v", talos.calls(), getHost(t, c).Status.DaemonAction)
	}
}
