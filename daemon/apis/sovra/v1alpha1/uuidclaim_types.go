package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// UUIDClaimSpec names the record an SMBIOS UUID is bound to.
type UUIDClaimSpec struct {
	// Node is the SovraNode the UUID is bound to.
	Node string `json:"node"`
	// NodeUID is that record's UID, once the record exists: a record
	// created again under the same name does not inherit the claim.
	// +optional
	NodeUID types.UID `json:"nodeUID,omitempty"`
}

// UUIDClaim binds an SMBIOS UUID (its name, in lower case) to one
// SovraNode. Creating it is the atomic step of binding a UUID, so two TPMs
// that enroll with one UUID at the same moment, on one replica or two, never
// both get it; the KMS serves only the record the claim names. Deleting the
// record deletes its claim (owner reference).
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster
// +kubebuilder:printcolumn:name="Node",type=string,JSONPath=`.spec.node`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type UUIDClaim struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec UUIDClaimSpec `json:"spec"`
}

// UUIDClaimList is a list of UUIDClaims.
//
// +kubebuilder:object:root=true
type UUIDClaimList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []UUIDClaim `json:"items"`
}
