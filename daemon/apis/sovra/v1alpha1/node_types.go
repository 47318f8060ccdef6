package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// LabelUUID labels a SovraNode with the SMBIOS UUID it enrolled with, so
// the KMS finds a node by the UUID Talos sends.
const LabelUUID = "sovra.dev/uuid"

// Condition types of a SovraNode.
const (
	// ConditionEnrolled is True once the node's AK was activated against its EK.
	ConditionEnrolled = "Enrolled"
	// ConditionAttested is True while the node's last attestation passed.
	ConditionAttested = "Attested"
)

// Attestation results.
const (
	ResultPassed = "Passed"
	ResultFailed = "Failed"
)

// Condition and event reasons.
const (
	ReasonActivated         = "CredentialActivated"
	ReasonAttestationPassed = "AttestationPassed"
	ReasonPolicyViolation   = "PolicyViolation"
	ReasonEventLogMismatch  = "EventLogMismatch"
	ReasonEvidenceRejected  = "EvidenceRejected"
	ReasonNotAttested       = "NotAttested"
)

// SovraNodeSpec is what enrollment established. It changes only through a
// new enrollment that passes credential activation.
type SovraNodeSpec struct {
	// EKHash is the hex SHA-256 of the PKIX DER of the EK public key: the
	// node's identity.
	// +kubebuilder:validation:Pattern=`^[0-9a-f]{64}$`
	EKHash string `json:"ekHash"`
	// EKCertificate is the DER of the EK certificate, when the TPM had one.
	// +optional
	EKCertificate []byte `json:"ekCertificate,omitempty"`
	// EKPublic is the PKIX DER of the EK public key. Enrollment sets it.
	// +optional
	EKPublic []byte `json:"ekPublic,omitempty"`
	// AKPublic is the TPMT_PUBLIC of the attestation key pinned to the EK.
	// Enrollment sets it; a record an operator created before the node
	// enrolled (to label it with its cluster) has none and cannot attest.
	// +optional
	AKPublic []byte `json:"akPublic,omitempty"`
	// UUID is the machine's SMBIOS UUID as claimed at enrollment.
	// +optional
	UUID string `json:"uuid,omitempty"`
	// Hostname as claimed at enrollment.
	// +optional
	Hostname string `json:"hostname,omitempty"`
	// Addresses the node enrolled from and claimed.
	// +optional
	Addresses []string `json:"addresses,omitempty"`
}

// SovraNodeStatus is the node's trust state.
type SovraNodeStatus struct {
	// EnrolledAt is the time of the last successful enrollment.
	// +optional
	EnrolledAt *metav1.Time `json:"enrolledAt,omitempty"`
	// EnrollmentMethod says how the EK was admitted: Certificate,
	// AllowList or TrustOnFirstUse.
	// +optional
	EnrollmentMethod string `json:"enrollmentMethod,omitempty"`
	// LastAttestationTime is when the last authenticated attestation was judged.
	// +optional
	LastAttestationTime *metav1.Time `json:"lastAttestationTime,omitempty"`
	// LastAttestationResult is Passed or Failed.
	// +optional
	LastAttestationResult string `json:"lastAttestationResult,omitempty"`
	// Reason is a CamelCase reason for the last result.
	// +optional
	Reason string `json:"reason,omitempty"`
	// Message explains the last result for a human.
	// +optional
	Message string `json:"message,omitempty"`
	// Warnings are the Warn-mode findings of the last attestation.
	// +optional
	Warnings []string `json:"warnings,omitempty"`
	// PCRs are the hex SHA-256 PCR values of the last verified quote.
	// +optional
	PCRs map[string]string `json:"pcrs,omitempty"`
	// Claims are the claims of the last verified quote.
	// +optional
	Claims map[string]string `json:"claims,omitempty"`
	// Conditions: Enrolled and Attested.
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
	// KeySalt is the node's random key salt, written by the KMS on the
	// node's first Seal. With the daemon's master key it derives the key that
	// opens the node's sealed blobs; alone it opens nothing. It lives in the
	// status because enrollment rewrites the spec; deleting the record
	// destroys it, and with it every key the node sealed.
	// +optional
	KeySalt []byte `json:"keySalt,omitempty"`
}

// SovraNode is the daemon's record of an enrolled node, named after its EK.
// Deleting it revokes the node.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=snode
// +kubebuilder:subresource:status
// +kubebuilder:printcolumn:name="UUID",type=string,JSONPath=`.spec.uuid`
// +kubebuilder:printcolumn:name="Hostname",type=string,JSONPath=`.spec.hostname`
// +kubebuilder:printcolumn:name="Attested",type=string,JSONPath=`.status.conditions[?(@.type=="Attested")].status`
// +kubebuilder:printcolumn:name="Result",type=string,JSONPath=`.status.lastAttestationResult`
// +kubebuilder:printcolumn:name="Reason",type=string,JSONPath=`.status.reason`
// +kubebuilder:printcolumn:name="Last Attested",type=date,JSONPath=`.status.lastAttestationTime`
// +kubebuilder:printcolumn:name="Enrolled",type=date,JSONPath=`.status.enrolledAt`
type SovraNode struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   SovraNodeSpec   `json:"spec,omitempty"`
	Status SovraNodeStatus `json:"status,omitempty"`
}

// SovraNodeList is a list of SovraNodes.
//
// +kubebuilder:object:root=true
type SovraNodeList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []SovraNode `json:"items"`
}
