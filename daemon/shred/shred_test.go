package shred

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/workqueue"
	clocktesting "k8s.io/utils/clock/testing"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/attestation"
)

const wait = 5 * time.Second

// fakeDatastore records compactions and checkpoints.
type fakeDatastore struct {
	revision  atomic.Int64
	failNext  atomic.Bool
	compacted chan int64
	checked   chan struct{}
}

func newFakeDatastore() *fakeDatastore {
	return &fakeDatastore{compacted: make(chan int64, 16), checked: make(chan struct{}, 16)}
}

func (f *fakeDatastore) Revision(context.Context) (int64, error) { return f.revision.Load(), nil }

func (f *fakeDatastore) Compact(_ context.Context, rev int64) error {
	f.compacted <- rev
	if f.failNext.Swap(false) {
		return errors.New("database is locked")
	}
	return nil
}

func (f *fakeDatastore) Checkpoint(context.Context) error {
	f.checked <- struct{}{}
	return nil
}

func startForgetter(t *testing.T) (*forgetter, *fakeDatastore, *clocktesting.FakeClock) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	ds := newFakeDatastore()
	clk := clocktesting.NewFakeClock(time.Unix(1e9, 0))
	f := &forgetter{ds: ds, settle: DefaultSettle, interval: DefaultInterval, clock: clk, log: zap.NewNop(),
		deletions: make(chan deletion, 1)}
	go f.run(ctx)
	waiters(t, clk, 1) // the ticker
	return f, ds, clk
}

// waiters waits until the forgetter waits on n timers and tickers.
func waiters(t *testing.T, clk *clocktesting.FakeClock, n int) {
	t.Helper()
	deadline := time.Now().Add(wait)
	for clk.Waiters() != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d waiters, want %d", clk.Waiters(), n)
		}
		time.Sleep(time.Millisecond)
	}
}

func wantCompaction(t *testing.T, ds *fakeDatastore, rev int64, checkpoint bool) {
	t.Helper()
	select {
	case got := <-ds.compacted:
		if got != rev {
			t.Fatalf("compacted to %d, want %d", got, rev)
		}
	case <-time.After(wait):
		t.Fatalf("no compaction to %d", rev)
	}
	if !checkpoint {
		return
	}
	select {
	case <-ds.checked:
	case <-time.After(wait):
		t.Fatal("no checkpoint after the compaction")
	}
}

func noCompaction(t *testing.T, ds *fakeDatastore) {
	t.Helper()
	select {
	case got := <-ds.compacted:
		t.Fatalf("compacted to %d too early", got)
	case <-time.After(50 * time.Millisecond):
	}
}

// TestForgetterCompactsADeleteOnceSettled: a delete is compacted to its
// revision Settle after it was seen, then checkpointed; a failure is
// retried.
func TestForgetterCompactsADeleteOnceSettled(t *testing.T) {
	f, ds, clk := startForgetter(t)
	f.deletions <- deletion{node: "n1", revision: 42, requested: clk.Now(), seen: clk.Now()}
	waiters(t, clk, 2)
	clk.Step(DefaultSettle - time.Millisecond)
	noCompaction(t, ds)
	clk.Step(time.Millisecond)
	wantCompaction(t, ds, 42, true)

	ds.failNext.Store(true)
	waiters(t, clk, 1)
	f.deletions <- deletion{node: "n2", revision: 50, requested: clk.Now(), seen: clk.Now()}
	waiters(t, clk, 2)
	clk.Step(DefaultSettle)
	wantCompaction(t, ds, 50, false)
	waiters(t, clk, 2) // the retry's timer
	clk.Step(forgetRetry)
	wantCompaction(t, ds, 50, true)
}

// TestForgetterCompactsPeriodically: every Interval the forgetter reads
// the current revision and compacts to it Settle later.
func TestForgetterCompactsPeriodically(t *testing.T) {
	_, ds, clk := startForgetter(t)
	ds.revision.Store(77)
	clk.Step(DefaultInterval)
	waiters(t, clk, 2)
	noCompaction(t, ds)
	clk.Step(DefaultSettle)
	wantCompaction(t, ds, 77, true)
}

func node(name string, salt []byte, finalizers ...string) *v1alpha1.SovraNode {
	return &v1alpha1.SovraNode{
		ObjectMeta: metav1.ObjectMeta{Name: name, Finalizers: finalizers},
		Spec:       v1alpha1.SovraNodeSpec{EKHash: "00"},
		Status:     v1alpha1.SovraNodeStatus{KeySalt: salt},
	}
}

func newShredder(t *testing.T, funcs interceptor.Funcs, objs ...client.Object) (*shredder, client.Client) {
	t.Helper()
	scheme, err := attestation.Scheme()
	if err != nil {
		t.Fatal(err)
	}
	c := fake.NewClientBuilder().WithScheme(scheme).WithStatusSubresource(&v1alpha1.SovraNode{}).
		WithObjects(objs...).WithInterceptorFuncs(funcs).Build()
	s := &shredder{client: c, clock: clocktesting.NewFakeClock(time.Now()), log: zap.NewNop(),
		queue:     workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[string]()),
		requested: map[types.UID]time.Time{}}
	t.Cleanup(s.queue.ShutDown)
	return s, c
}

// TestReconcileAddsTheFinalizer: a record with a salt gets the finalizer;
// one without a salt does not.
func TestReconcileAddsTheFinalizer(t *testing.T) {
	ctx := context.Background()
	s, c := newShredder(t, interceptor.Funcs{}, node("salted", []byte("salt")), node("plain", nil))
	for _, name := range []string{"salted", "plain"} {
		if err := s.reconcile(ctx, name); err != nil {
			t.Fatal(err)
		}
	}
	var n v1alpha1.SovraNode
	if err := c.Get(ctx, client.ObjectKey{Name: "salted"}, &n); err != nil || len(n.Finalizers) != 1 || n.Finalizers[0] != v1alpha1.FinalizerShred {
		t.Fatalf("salted record: finalizers %v, %v", n.Finalizers, err)
	}
	if err := c.Get(ctx, client.ObjectKey{Name: "plain"}, &n); err != nil || len(n.Finalizers) != 0 {
		t.Fatalf("record without a salt: finalizers %v, %v", n.Finalizers, err)
	}
}

// TestReconcileScrubsBeforeReleasing: a deleted record loses its salt
// before its finalizer, and a salt written in between (a racing KMS) is
// removed too before the finalizer goes.
func TestReconcileScrubsBeforeReleasing(t *testing.T) {
	ctx := context.Background()
	var raced atomic.Bool
	var released atomic.Bool
	funcs := interceptor.Funcs{
		SubResourceUpdate: func(ctx context.Context, c client.Client, sub string, obj client.Object, opts ...client.SubResourceUpdateOption) error {
			if err := c.SubResource(sub).Update(ctx, obj, opts...); err != nil {
				return err
			}
			if !raced.Swap(true) { // a KMS writes a salt right after the first scrub
				var n v1alpha1.SovraNode
				if err := c.Get(ctx, client.ObjectKey{Name: obj.GetName()}, &n); err != nil {
					return err
				}
				n.Status.KeySalt = []byte("late salt")
				return c.Status().Update(ctx, &n)
			}
			return nil
		},
		Update: func(ctx context.Context, c client.WithWatch, obj client.Object, opts ...client.UpdateOption) error {
			var stored v1alpha1.SovraNode
			if err := c.Get(ctx, client.ObjectKey{Name: obj.GetName()}, &stored); err != nil {
				return err
			}
			if stored.ResourceVersion == obj.GetResourceVersion() && len(stored.Status.KeySalt) > 0 {
				t.Error("the finalizer went from a version that holds a salt")
			}
			if err := c.Update(ctx, obj, opts...); err != nil {
				return err
			}
			released.Store(true)
			return nil
		},
	}
	s, c := newShredder(t, funcs, node("n1", []byte("salt"), v1alpha1.FinalizerShred))
	if err := c.Delete(ctx, node("n1", nil)); err != nil {
		t.Fatal(err)
	}
	err := s.reconcile(ctx, "n1")
	if !apierrors.IsConflict(err) {
		t.Fatalf("first round: %v, want a conflict (the late salt)", err)
	}
	if err := s.reconcile(ctx, "n1"); err != nil {
		t.Fatal(err)
	}
	var n v1alpha1.SovraNode
	if err := c.Get(ctx, client.ObjectKey{Name: "n1"}, &n); !apierrors.IsNotFound(err) || !released.Load() {
		t.Fatalf("record after release: %v, released %v", err, released.Load())
	}
}

// TestSlimDropsTheSalt: the cache holds no salt, only that there is one.
func TestSlimDropsTheSalt(t *testing.T) {
	out, err := slim(node("n1", []byte("0123456789abcdef0123456789abcdef"), v1alpha1.FinalizerShred))
	if err != nil {
		t.Fatal(err)
	}
	n := out.(*v1alpha1.SovraNode)
	if string(n.Status.KeySalt) != string(saltMarker) || n.Spec.EKHash != "" || !needsWork(node("x", n.Status.KeySalt)) {
		t.Fatalf("slimmed record: %+v", n)
	}
}
