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
