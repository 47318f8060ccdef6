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
type AttestationPolicySpec struct {
	// NodeSelector selects SovraNodes by label; empty selects every node.
	// +optional
	NodeSelector *NodeSelector `json:"nodeSelector,omitempty"`
	// PCRs are rules on quoted PCR values.
	// +kubebuilder:validation:MaxItems=64
	// +optional
	PCRs []PCRRule `json:"pcrs,omitempty"`
	// Claims are rules on quoted claims.
	// +kubebuilder:validation:MaxItems=256
	// +optional
	Claims []ClaimRule `json:"claims,omitempty"`
}

// NodeSelector is a Kubernetes label selector (the same fields and
// meaning), bounded and checked at admission.
type NodeSelector struct {
	// MatchLabels: each key must have this value.
	// +kubebuilder:validation:MaxProperties=32
	// +kubebuilder:validation:XValidation:rule="self.all(k, size(k) <= 317 && k.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$'))",message="matchLabels: every key must be a label key (an optional DNS-subdomain prefix and '/', then a name of letters, digits, '-', '_' and '.')"
	// +optional
	MatchLabels map[string]LabelValue `json:"matchLabels,omitempty"`
	// MatchExpressions: each must hold.
	// +kubebuilder:validation:MaxItems=32
	// +optional
	MatchExpressions []NodeSelectorRequirement `json:"matchExpressions,omitempty"`
}

// LabelValue is a label value: at most 63 letters, digits, '-', '_' and '.',
// starting and ending with a letter or digit, or empty.
// +kubebuilder:validation:MaxLength=63
// +kubebuilder:validation:Pattern=`^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$`
type LabelValue string

// NodeSelectorRequirement is a label selector requirement.
//
// +kubebuilder:validation:XValidation:rule="(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",message="In and NotIn need values; Exists and DoesNotExist take none"
type NodeSelectorRequirement struct {
	// Key is the label key.
	// +kubebuilder:validation:MaxLength=317
	// +kubebuilder:validation:Pattern=`^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$`
	Key string `json:"key"`
	// Operator is In, NotIn, Exists or DoesNotExist.
	// +kubebuilder:validation:Enum=In;NotIn;Exists;DoesNotExist
	Operator metav1.LabelSelectorOperator `json:"operator"`
	// Values for In and NotIn.
	// +kubebuilder:validation:MaxItems=64
	// +optional
	Values []LabelValue `json:"values,omitempty"`
}

// LabelSelector is the selector in Kubernetes' own type.
func (s *NodeSelector) LabelSelector() *metav1.LabelSelector {
	if s == nil {
		return nil
	}
	out := &metav1.LabelSelector{}
	if len(s.MatchLabels) > 0 {
		out.MatchLabels = make(map[string]string, len(s.MatchLabels))
		for k, v := range s.MatchLabels {
			out.MatchLabels[k] = string(v)
		}
	}
	for _, r := range s.MatchExpressions {
		req := metav1.LabelSelectorRequirement{Key: r.Key, Operator: r.Operator}
		for _, v := range r.Values {
			req.Values = append(req.Values, string(v))
		}
		out.MatchExpressions = append(out.MatchExpressions, req)
	}
	return out
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
