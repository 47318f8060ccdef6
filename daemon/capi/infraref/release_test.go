package infraref

import (
	"context"
	"strings"
	"testing"

	controlplanev1alpha3 "github.com/siderolabs/cluster-api-control-plane-provider-talos/api/v1alpha3"
	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta/testrestmapper"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/record"
	clusterv1 "sigs.k8s.io/cluster-api/api/v1beta1"
	expv1 "sigs.k8s.io/cluster-api/exp/api/v1beta1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
)

// deletedCluster is a Cluster being deleted, held by Cluster API's
// finalizer, whose infrastructure is an AzureCluster and whose control
// plane a TalosControlPlane named at the contract version.
func deletedCluster() *clusterv1.Cluster {
	now := metav1.Now()
	return &clusterv1.Cluster{
		ObjectMeta: metav1.ObjectMeta{Name: "demo", Namespace: "ns", DeletionTimestamp: &now, Finalizers: []string{clusterv1.ClusterFinalizer}},
		Spec: clusterv1.ClusterSpec{
			InfrastructureRef: &corev1.ObjectReference{APIVersion: "infrastructure.cluster.x-k8s.io/v1beta1", Kind: "AzureCluster", Name: "demo"},
			ControlPlaneRef:   &corev1.ObjectReference{APIVersion: "controlplane.cluster.x-k8s.io/v1beta1", Kind: "TalosControlPlane", Name: "demo-cp"},
		},
	}
}

func releaseScheme(t *testing.T) *runtime.Scheme {
	t.Helper()
	s := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{
		corev1.AddToScheme, apiextensionsv1.AddToScheme, clusterv1.AddToScheme, expv1.AddToScheme, controlplanev1alpha3.AddToScheme,
	} {
		if err := add(s); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

func TestMissingInfrastructureReconciler(t *testing.T) {
	labelled := metav1.ObjectMeta{Name: "w-1", Namespace: "ns", Labels: map[string]string{clusterv1.ClusterNameLabel: "demo"}}
	cases := []struct {
		name     string
		mutate   func(*clusterv1.Cluster)
		objs     []client.Object
		released bool
		requeue  bool
	}{
		{name: "nothing left", released: true},
		{name: "infrastructure CRD installed", objs: []client.Object{crd("azureclusters.infrastructure.cluster.x-k8s.io", false)}},
		{name: "infrastructure CRD being deleted", objs: []client.Object{crd("azureclusters.infrastructure.cluster.x-k8s.io", true)}},
		{name: "a machine left", objs: []client.Object{&clusterv1.Machine{ObjectMeta: labelled}}, requeue: true},
		{name: "a machine deployment left", objs: []client.Object{&clusterv1.MachineDeployment{ObjectMeta: labelled}}, requeue: true},
		{name: "a machine pool left", objs: []client.Object{&expv1.MachinePool{ObjectMeta: labelled}}, requeue: true},
		{name: "another cluster's machine", objs: []client.Object{&clusterv1.Machine{ObjectMeta: metav1.ObjectMeta{
			Name: "w-2", Namespace: "ns", Labels: map[string]string{clusterv1.ClusterNameLabel: "other"}}}}, released: true},
		{name: "control plane left", objs: []client.Object{&controlplanev1alpha3.TalosControlPlane{ObjectMeta: metav1.ObjectMeta{Name: "demo-cp", Namespace: "ns"}}}, requeue: true},
		{name: "control plane kind not installed", mutate: func(c *clusterv1.Cluster) {
			c.Spec.ControlPlaneRef.APIVersion, c.Spec.ControlPlaneRef.Kind = "controlplane.example.com/v1", "GoneControlPlane"
		}, released: true},
		{name: "no control plane", mutate: func(c *clusterv1.Cluster) { c.Spec.ControlPlaneRef = nil }, released: true},
		{name: "paused", mutate: func(c *clusterv1.Cluster) { c.Spec.Paused = true }},
		{name: "another finalizer only", mutate: func(c *clusterv1.Cluster) { c.Finalizers = []string{"example.com/keep"} }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cluster := deletedCluster()
			if c.mutate != nil {
				c.mutate(cluster)
			}
			scheme := releaseScheme(t)
			cl := fake.NewClientBuilder().WithScheme(scheme).WithRESTMapper(testrestmapper.TestOnlyStaticRESTMapper(scheme)).
				WithObjects(append(c.objs, cluster)...).Build()
			events := record.NewFakeRecorder(10)
			r := &MissingInfrastructureReconciler{Client: cl, APIReader: cl, Events: events, Logger: zap.NewNop()}
			res, err := r.Reconcile(context.Background(), ctrl.Request{NamespacedName: types.NamespacedName{Namespace: "ns", Name: "demo"}})
			if err != nil {
				t.Fatal(err)
			}
			if got := res.RequeueAfter > 0; got != c.requeue {
				t.Errorf("requeue = %v, want %v", got, c.requeue)
			}
			var after clusterv1.Cluster
			err = cl.Get(context.Background(), client.ObjectKeyFromObject(cluster), &after)
			released := apierrors.IsNotFound(err)
			if err != nil && !released {
				t.Fatal(err)
			}
			if released != c.released {
				t.Fatalf("released = %v, want %v (finalizers %v)", released, c.released, after.Finalizers)
			}
			if !c.released {
				if len(events.Events) > 0 {
					t.Errorf("event on a cluster kept: %s", <-events.Events)
				}
				return
			}
			select {
			case e := <-events.Events:
				if !strings.HasPrefix(e, "Normal "+ReleasedReason) || !strings.Contains(e, "azureclusters.infrastructure.cluster.x-k8s.io") {
					t.Errorf("event %q", e)
				}
			default:
				t.Error("no event for the released cluster")
			}
		})
	}
}
