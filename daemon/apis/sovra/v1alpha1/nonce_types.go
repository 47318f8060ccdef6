package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// LabelNode labels an AttestationNonce with the node it was issued to.
const LabelNode = "sovra.dev/node"

// AttestationNonceSpec names the node whose quote used a nonce, and when the
// nonce expires.
type AttestationNonceSpec struct {
	// Node is the SovraNode the nonce was issued to and used by.
	Node string `json:"node"`
	// ExpiresAt is when the nonce stops being accepted anyway; the marker
	// is removed after it.
	ExpiresAt metav1.Time `json:"expiresAt"`
}

// AttestationNonce marks a nonce as used. Nonces are stateless (a MAC any
// replica checks), so issuing one stores nothing; a quote signed with the
// node's pinned AK consumes its nonce by creating this marker, named after the
// nonce's hash, and a second use finds it and is refused on every replica.
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
