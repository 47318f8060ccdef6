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
//
// +kubebuilder:validation:XValidation:rule="self.index in [0, 1, 2, 3, 4, 5, 6, 7, 11]",message="only PCRs 0-7 and 11 are quoted: a rule on another PCR could never pass"
type PCRRule struct {
	// Index of the PCR; one of the quoted PCRs 0-7 and 11.
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=23
	Index int `json:"index"`
	// Values are hex SHA-256 digests (64 hex digits, optionally 0x); any
	// one passes.
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=64
	// +kubebuilder:validation:items:Pattern=`^(0[xX])?[0-9a-fA-F]{64}$`
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
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=128
	// +kubebuilder:validation:Pattern=`^[!#-\[\]-~]+$`
	Name string `json:"name"`
	// Values that pass; empty means any readable value.
	// +kubebuilder:validation:MaxItems=64
	// +optional
	Values []string `json:"values,omitempty"`
	// Mode defaults to Enforce.
	// +kubebuilder:default=Enforce
	// +optional
	Mode Mode `json:"mode,omitempty"`
}

// AttestationPolicySpec is a set of rules for the nodes it selects. A policy
// the daemon cannot evaluate (a selector that does not parse, a malformed
// value) fails every node rather than none; admission refuses what it can
// tell is malformed.
//
// +kubebuilder:validation:XValidation:rule="!has(self.nodeSelector) || !has(self.nodeSelector.matchExpressions) || self.nodeSelector.matchExpressions.all(e, e.operator in ['In', 'NotIn', 'Exists', 'DoesNotExist'])",message="nodeSelector: a match expression's operator must be In, NotIn, Exists or DoesNotExist"
// +kubebuilder:validation:XValidation:rule="!has(self.nodeSelector) || !has(self.nodeSelector.matchExpressions) || self.nodeSelector.matchExpressions.all(e, (e.operator in ['In', 'NotIn']) == (has(e.values) && size(e.values) > 0))",message="nodeSelector: In and NotIn need values; Exists and DoesNotExist take none"
// +kubebuilder:validation:XValidation:rule="!has(self.nodeSelector) || !has(self.nodeSelector.matchExpressions) || self.nodeSelector.matchExpressions.all(e, e.key.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$'))",message="nodeSelector: a match expression's key is not a label key"
// +kubebuilder:validation:XValidation:rule="!has(self.nodeSelector) || !has(self.nodeSelector.matchLabels) || self.nodeSelector.matchLabels.all(k, k.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$') && self.nodeSelector.matchLabels[k].matches('^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$'))",message="nodeSelector: matchLabels holds a key or value that is not a label key or value"
type AttestationPolicySpec struct {
	// NodeSelector selects SovraNodes by label; empty selects every node.
	// +optional
	NodeSelector *metav1.LabelSelector `json:"nodeSelector,omitempty"`
	// PCRs are rules on quoted PCR values.
	// +kubebuilder:validation:MaxItems=64
	// +optional
	PCRs []PCRRule `json:"pcrs,omitempty"`
	// Claims are rules on quoted claims.
	// +kubebuilder:validation:MaxItems=256
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
