package attestation

import (
	"context"
	"testing"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/api/meta/testrestmapper"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
)

func TestInstallCRDs(t *testing.T) {
	s, err := Scheme()
	if err != nil {
		t.Fatal(err)
	}
	c := fake.NewClientBuilder().WithScheme(s).WithRESTMapper(testrestmapper.TestOnlyStaticRESTMapper(s)).Build()
	ctx := context.Background()
	for range 2 { // install, then update in place
		if err := InstallCRDs(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	var list apiextensionsv1.CustomResourceDefinitionList
	want, err := v1alpha1.CRDs()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.List(ctx, &list); err != nil || len(list.Items) != len(want) {
		t.Fatalf("CRDs installed: %d (%v)", len(list.Items), err)
	}
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if err := WaitForCRDs(short, c); err == nil {
		t.Fatal("WaitForCRDs passed without an Established condition")
	}
	for i := range list.Items {
		crd := &list.Items[i]
		crd.Status.Conditions = []apiextensionsv1.CustomResourceDefinitionCondition{{Type: apiextensionsv1.Established, Status: apiextensionsv1.ConditionTrue}}
		if err := c.Status().Update(ctx, crd); err != nil {
			t.Fatal(err)
		}
	}
	// Established, but discovery does not serve the kinds yet.
	unserved := fake.NewClientBuilder().WithScheme(s).WithObjects(objects(list.Items)...).Build()
	shortAgain, cancelAgain := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancelAgain()
	if err := WaitForCRDs(shortAgain, unserved); err == nil {
		t.Fatal("WaitForCRDs passed before discovery served the kinds")
	}
	wait, cancelWait := context.WithTimeout(ctx, 5*time.Second)
	defer cancelWait()
	if err := WaitForCRDs(wait, c); err != nil {
		t.Fatal(err)
	}
}

func objects(crds []apiextensionsv1.CustomResourceDefinition) []client.Object {
	out := make([]client.Object, len(crds))
	for i := range crds {
		crd := crds[i].DeepCopy()
		crd.ResourceVersion = ""
		out[i] = crd
	}
	return out
}

// TestInstallCRDsLosesRace: another installer (the node API, the KMS or the
// Cluster API manager of this replica) creates, then updates, each CRD
// between this one's read and its write; InstallCRDs reads again and wins.
func TestInstallCRDsLosesRace(t *testing.T) {
	s, err := Scheme()
	if err != nil {
		t.Fatal(err)
	}
	rivalled := map[string]bool{}
	c := fake.NewClientBuilder().WithScheme(s).WithInterceptorFuncs(interceptor.Funcs{
		Create: func(ctx context.Context, c client.WithWatch, obj client.Object, opts ...client.CreateOption) error {
			if !rivalled["create "+obj.GetName()] {
				rivalled["create "+obj.GetName()] = true
				rival := obj.DeepCopyObject().(client.Object)
				if err := c.Create(ctx, rival); err != nil {
					t.Fatal(err)
				}
			}
			return c.Create(ctx, obj, opts...)
		},
		Update: func(ctx context.Context, c client.WithWatch, obj client.Object, opts ...client.UpdateOption) error {
			if !rivalled["update "+obj.GetName()] {
				rivalled["update "+obj.GetName()] = true
				var rival apiextensionsv1.CustomResourceDefinition
				if err := c.Get(ctx, client.ObjectKeyFromObject(obj), &rival); err != nil {
					t.Fatal(err)
				}
				if err := c.Update(ctx, &rival); err != nil {
					t.Fatal(err)
				}
			}
			return c.Update(ctx, obj, opts...)
		},
	}).Build()
	ctx := context.Background()
	for i := range 2 { // lose the create race, then the update race
		if err := InstallCRDs(ctx, c); err != nil {
			t.Fatalf("install %d: %v", i, err)
		}
	}
	want, err := v1alpha1.CRDs()
	if err != nil {
		t.Fatal(err)
	}
	if len(rivalled) != 2*len(want) {
		t.Errorf("raced %d writes, want %d", len(rivalled), 2*len(want))
	}
}
