package attestation

import (
	"context"
	"testing"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
)

func TestInstallCRDs(t *testing.T) {
	s, err := Scheme()
	if err != nil {
		t.Fatal(err)
	}
	c := fake.NewClientBuilder().WithScheme(s).Build()
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
	wait, cancelWait := context.WithTimeout(ctx, 5*time.Second)
	defer cancelWait()
	if err := WaitForCRDs(wait, c); err != nil {
		t.Fatal(err)
	}
}
