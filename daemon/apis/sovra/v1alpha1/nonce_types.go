package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// LabelNode labels an AttestationNonce with the node it was issued to.
const LabelNode = "sovra.dev/node"

// AttestationNonceSpec binds an issued nonce to a node and a deadline.
type AttestationNonceSpec struct {
	// Node is the SovraNode the nonce was issued to.
	Node string `json:"node"`
	// ExpiresAt is when the nonce stops being accepted.
	ExpiresAt metav1.Time `json:"expiresAt"`
}

// AttestationNonce is an issued, unused nonce. Its name is derived from the
// nonce; consuming it deletes it, so it is accepted at most once by any
// replica.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster
// +kubebuilder:printcolumn:name="Node",type=string,JSONPath=`.spec.node`
// +kubebuilder:printcolumn:name="Expires",type=string,JSONPath=`.spec.expiresAt`
type AttestationNonce struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec AttestationNonceSpec `json:"spec"`
}

// AttestationNonceList is a list of AttestationNonces.
//
// +kubebuilder:object:root=true
type AttestationNonceList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []AttestationNonce `json:"items"`
}
