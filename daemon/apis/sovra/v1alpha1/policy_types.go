package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Mode says what breaking a rule does.
// +kubebuilder:validation:Enum=Enforce;Warn
type Mode string

// Modes.
const (
	// ModeEnforce fails the attestation.
	ModeEnforce Mode = "Enforce"
	// ModeWarn records the finding and lets the attestation pass.
	ModeWarn Mode = "Warn"
)

// PCRRule requires a PCR to hold one of the listed SHA-256 values.
type PCRRule struct {
	// Index of the PCR; one of the quoted PCRs 0-7 and 11.
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=23
	Index int `json:"index"`
	// Values are hex SHA-256 digests; any one passes.
	// +kubebuilder:validation:MinItems=1
	Values []string `json:"values"`
	// Mode defaults to Enforce.
	// +kubebuilder:default=Enforce
	// +optional
	Mode Mode `json:"mode,omitempty"`
}

// ClaimRule requires a claim to be readable and, when Values is set, to equal
// one of them.
type ClaimRule struct {
	// Name of the claim, e.g. secureboot, kernel.lockdown, lsm.selinux,
	// talos.version, extension/<name>.
	Name string `json:"name"`
	// Values that pass; empty means any readable value.
	// +optional
	Values []string `json:"values,omitempty"`
	// Mode defaults to Enforce.
	// +kubebuilder:default=Enforce
	// +optional
	Mode Mode `json:"mode,omitempty"`
}

// AttestationPolicySpec is a set of rules for the nodes it selects.
type AttestationPolicySpec struct {
	// NodeSelector selects SovraNodes by label; empty selects every node.
	// +optional
	NodeSelector *metav1.LabelSelector `json:"nodeSelector,omitempty"`
	// PCRs are rules on quoted PCR values.
	// +optional
	PCRs []PCRRule `json:"pcrs,omitempty"`
	// Claims are rules on quoted claims.
	// +optional
	Claims []ClaimRule `json:"claims,omitempty"`
}

// AttestationPolicy judges node attestations. Every policy whose selector
// matches a node applies; a node passes when no Enforce rule of any of them
// is broken.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=apol
// +kubebuilder:printcolumn:name="Selector",type=string,JSONPath=`.spec.nodeSelector`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type AttestationPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec AttestationPolicySpec `json:"spec,omitempty"`
}

// AttestationPolicyList is a list of AttestationPolicies.
//
// +kubebuilder:object:root=true
type AttestationPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []AttestationPolicy `json:"items"`
}
