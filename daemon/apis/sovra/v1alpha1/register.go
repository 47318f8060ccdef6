package v1alpha1

import (
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/scheme"
)

// GroupVersion is the API group and version of these types.
var GroupVersion = schema.GroupVersion{Group: "sovra.dev", Version: "v1alpha1"}

var (
	// SchemeBuilder registers the types with a scheme.
	SchemeBuilder = &scheme.Builder{GroupVersion: GroupVersion}
	// AddToScheme adds the types to a scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)

func init() {
	SchemeBuilder.Register(&SovraNode{}, &SovraNodeList{},
		&AttestationPolicy{}, &AttestationPolicyList{},
		&AttestationNonce{}, &AttestationNonceList{},
		&UUIDClaim{}, &UUIDClaimList{},
		&UnsealLedger{}, &UnsealLedgerList{},
		&Host{}, &HostList{})
}

// Ensure the types are runtime.Objects.
var _ runtime.Object = &SovraNode{}
