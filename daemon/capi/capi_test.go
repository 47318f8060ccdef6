package capi

import (
	"errors"
	"fmt"
	"testing"

	bootstrapv1alpha3 "github.com/siderolabs/cluster-api-bootstrap-provider-talos/api/v1alpha3"
	controlplanev1alpha3 "github.com/siderolabs/cluster-api-control-plane-provider-talos/api/v1alpha3"
	"k8s.io/apimachinery/pkg/runtime"
	clusterv1 "sigs.k8s.io/cluster-api/api/v1beta1"
	"sigs.k8s.io/controller-runtime/pkg/webhook/conversion"

	"github.com/sovra-dev/sovra/daemon/capi/crds"
	"github.com/sovra-dev/sovra/daemon/capi/infraref"
	"github.com/sovra-dev/sovra/daemon/capi/webhooks"
)

// TestSchemeServesConversion: the scheme holds every version the Talos
// bootstrap provider serves, so /convert can convert between them.
func TestSchemeServesConversion(t *testing.T) {
	s := NewScheme()
	for _, hub := range []runtime.Object{&bootstrapv1alpha3.TalosConfig{}, &bootstrapv1alpha3.TalosConfigTemplate{}} {
		if ok, err := conversion.IsConvertible(s, hub); err != nil || !ok {
			t.Errorf("%T is not convertible from its older version: %v", hub, err)
		}
	}
	for _, o := range []runtime.Object{&clusterv1.Cluster{}, &clusterv1.MachineDeployment{}, &controlplanev1alpha3.TalosControlPlane{}} {
		if _, _, err := s.ObjectKinds(o); err != nil {
			t.Errorf("%T not in the scheme: %v", o, err)
		}
	}
}

func TestIsLeadershipLost(t *testing.T) {
	if !isLeadershipLost(fmt.Errorf("running the Cluster API manager: %w", errors.New("leader election lost"))) {
		t.Error("controller-runtime's leader loss not recognised")
	}
	if isLeadershipLost(errors.New("failed to wait for caches to sync")) || isLeadershipLost(nil) {
		t.Error("another failure taken for a leader loss")
	}
}

// TestSovraProvider: sovra's CRDs carry the provider and contract labels,
// and its provider registers the infrastructure-reference webhook at the
// URL sovrad serves it on.
func TestSovraProvider(t *testing.T) {
	p, err := sovraProvider()
	if err != nil {
		t.Fatal(err)
	}
	if len(p.CRDs) != 3 {
		t.Fatalf("want 3 CRDs, got %d", len(p.CRDs))
	}
	for _, crd := range p.CRDs {
		labels := crd.GetLabels()
		if labels[providerLabel] != sovraProviderName || labels["cluster.x-k8s.io/v1beta1"] != "v1alpha1" {
			t.Errorf("%s: labels %v", crd.GetName(), labels)
		}
	}
	regs := webhooks.Registrations([]crds.Provider{p}, "https://10.0.0.1:9443", []byte("ca"), []string{infraref.Path})
	if len(regs) != 1 || regs[0].GetName() != infraref.ConfigurationName {
		t.Fatalf("registrations: %v", regs)
	}
	if regs := webhooks.Registrations([]crds.Provider{p}, "https://10.0.0.1:9443", []byte("ca"), nil); len(regs) != 0 {
		t.Errorf("registered a webhook that is not served: %v", regs)
	}
}
