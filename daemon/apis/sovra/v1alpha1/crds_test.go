package v1alpha1

import (
	"reflect"
	"testing"

	"k8s.io/apimachinery/pkg/runtime"
)

func TestCRDsCoverTypes(t *testing.T) {
	crds, err := CRDs()
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[string]bool{}
	for _, c := range crds {
		if c.Spec.Group != GroupVersion.Group {
			t.Errorf("CRD %s has group %s", c.Name, c.Spec.Group)
		}
		if c.Spec.Scope != "Cluster" {
			t.Errorf("CRD %s is %s-scoped, want Cluster", c.Name, c.Spec.Scope)
		}
		kinds[c.Spec.Names.Kind] = true
	}
	for _, obj := range []runtime.Object{&SovraNode{}, &AttestationPolicy{}, &AttestationNonce{}, &UUIDClaim{}, &UnsealLedger{}, &Host{}} {
		kind := reflect.TypeOf(obj).Elem().Name()
		if !kinds[kind] {
			t.Errorf("kind %s has no CRD: run go generate ./daemon/apis/...", kind)
		}
	}
}
