package hosts

import (
	"context"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
)

// TestHostFailedToldOnce: taking an accepted host out of the pool updates
// its spec, which starts another reconcile; that one may read a cache the
// status write has not reached yet (the host not Failed). It makes the same
// transition, and its write conflicts: it must not log it again.
func TestHostFailedToldOnce(t *testing.T) {
	ctx := context.Background()
	scheme := runtime.NewScheme()
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	host := &v1alpha1.Host{ObjectMeta: metav1.ObjectMeta{Name: "h"}, Spec: v1alpha1.HostSpec{Accepted: true},
		Status: v1alpha1.HostStatus{Phase: v1alpha1.HostAvailable}}
	rec := &v1alpha1.SovraNode{ObjectMeta: metav1.ObjectMeta{Name: "h"},
		Status: v1alpha1.SovraNodeStatus{LastAttestationResult: v1alpha1.ResultFailed, Reason: v1alpha1.ReasonPolicyViolation}}
	var stale *v1alpha1.Host // the host as the spec update left it
	serveStale := false
	c := fake.NewClientBuilder().WithScheme(scheme).WithStatusSubresource(&v1alpha1.Host{}, &v1alpha1.SovraNode{}).
		WithObjects(host, rec).WithInterceptorFuncs(interceptor.Funcs{
		Update: func(ctx context.Context, c client.WithWatch, obj client.Object, opts ...client.UpdateOption) error {
			err := c.Update(ctx, obj, opts...)
			if h, ok := obj.(*v1alpha1.Host); ok && err == nil {
				stale = h.DeepCopy()
			}
			return err
		},
		Get: func(ctx context.Context, c client.WithWatch, key client.ObjectKey, obj client.Object, opts ...client.GetOption) error {
			if h, ok := obj.(*v1alpha1.Host); ok && serveStale && stale != nil {
				stale.DeepCopyInto(h)
				return nil
			}
			return c.Get(ctx, key, obj, opts...)
		},
	}).Build()
	core, logs := observer.New(zap.InfoLevel)
	r := &Reconciler{Client: c, Logger: zap.New(core)}
	req := ctrl.Request{NamespacedName: types.NamespacedName{Name: "h"}}

	if _, err := r.Reconcile(ctx, req); err != nil {
		t.Fatal(err)
	}
	serveStale = true // the reconcile the spec update started, on a lagging cache
	if _, err := r.Reconcile(ctx, req); err != nil {
		t.Fatal(err)
	}

	var got v1alpha1.Host
	serveStale = false
	if err := c.Get(ctx, req.NamespacedName, &got); err != nil {
		t.Fatal(err)
	}
	if got.Status.Phase != v1alpha1.HostFailed || got.Spec.Accepted {
		t.Fatalf("the host is %s, accepted %v; want Failed, not accepted", got.Status.Phase, got.Spec.Accepted)
	}
	if n := logs.FilterMessage("host failed attestation: out of the pool").Len(); n != 1 {
		t.Fatalf("the transition to Failed was logged %d times, want once", n)
	}
}
