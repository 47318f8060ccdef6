package capi

import (
	"errors"
	"fmt"
	"testing"

	bootstrapv1alpha3 "github.com/siderolabs/cluster-api-bootstrap-provider-talos/api/v1alpha3"
	controlplanev1alpha3 "github.com/siderolabs/cluster-api-control-plane-provider-talos/api/v1alpha3"
	clusterv1 "sigs.k8s.io/cluster-api/api/v1beta1"
	"sigs.k8s.io/controller-runtime/pkg/webhook/conversion"
)

// TestSchemeServesConversion: the scheme holds every version the Talos
// bootstrap provider serves, so /convert can convert between them.
func TestSchemeServesConversion(t *testing.T) {
	s := NewScheme()
	for _, obj := range []struct {
		name        string
		convertible bool
		isConverted func() (bool, error)
	}{
		{"TalosConfig", true, func() (bool, error) { return conversion.IsConvertible(s, &bootstrapv1alpha3.TalosConfig{}) }},
		{"TalosConfigTemplate", true, func() (bool, error) { return conversion.IsConvertible(s, &bootstrapv1alpha3.TalosConfigTemplate{}) }},
	} {
		got, err := obj.isConverted()
		if err != nil || got != obj.convertible {
			t.Errorf("%s convertible = %v (%v), want %v", obj.name, got, err, obj.convertible)
		}
	}
	for _, o := range []any{&clusterv1.Cluster{}, &clusterv1.MachineDeployment{}, &controlplanev1alpha3.TalosControlPlane{}} {
		if _, _, err := s.ObjectKinds(o.(interface {
			DeepCopyObject() interface{ GetObjectKind() any }
		})); err != nil {
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
