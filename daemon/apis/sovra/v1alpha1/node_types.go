package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// LabelUUID labels a SovraNode with the SMBIOS UUID it enrolled with, so
// the KMS finds a node by the UUID Talos sends.
const LabelUUID = "sovra.dev/uuid"

// LabelLabPending marks a pending record: one sovrad made for a machine that
// seals before it enrolls (in lab mode, on its first Seal; or when it fetched
// the enrollment configuration); its salt moves to the machine's enrolled
// record when one claims the same UUID.
const LabelLabPending = "kms.sovra.dev/lab-pending"

// Condition types of a SovraNode.
const (
	// ConditionEnrolled is True once the node's AK was activated against its EK.
	ConditionEnrolled = "Enrolled"
	// ConditionAttested is True while the node's last attestation passed.
	ConditionAttested = "Attested"
	// ConditionQuarantined is True while the node may not Unseal: it
	// unsealed and then failed attestation (or, in lab mode, never
	// enrolled; or, where the KMS is told to, a release no boot explains).
	// Only an operator clears it.
	ConditionQuarantined = "Quarantined"
	// ConditionUnexpectedUnseal is True once the KMS released a key of the
	// node that none of the boots the node reported explains: a copy of its
	// disk opened elsewhere, or a boot that never attested. An operator
	// clears it after looking (see the KMS's clear annotation).
	ConditionUnexpectedUnseal = "UnexpectedUnseal"
)

// FinalizerShred is on every SovraNode that holds a key salt: before the
// record goes, sovrad removes the salt from it, so that no copy of the salt
// outlives the record in the datastore's history (crypto-shredding).
const FinalizerShred = "sovra.dev/shred-keys"

// Why a sealing window is open.
const (
	// WindowEnrollment: the node enrolled and had never sealed.
	WindowEnrollment = "Enrollment"
	// WindowPreRegistration: the record is new (created by an operator or
	// by enrollment) and has never sealed outside this first window.
	WindowPreRegistration = "PreRegistration"
	// WindowOperator: an operator opened it with an annotation.
	WindowOperator = "Operator"
	// WindowWipe: sovra wiped the machine and it formats its volumes anew.
	WindowWipe = "Wipe"
	// WindowBootConfig: a machine sovra never saw fetched the enrollment
	// configuration; the window is bound to the address it fetched from.
	WindowBootConfig = "BootConfig"
)

// Limits of the status lists.
const (
	// MaxBoots is how many reported boots a record keeps.
	MaxBoots = 4
	// MaxRecentSeals is how many sealed blobs a record remembers.
	MaxRecentSeals = 8
	// MaxUnexpectedUnseals is how many unexplained releases a record lists.
	MaxUnexpectedUnseals = 8
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
	// Policies are the AttestationPolicies the last attestation was judged by.
	// +optional
	// +listType=atomic
	Policies []string `json:"policies,omitempty"`
	// Conditions: Enrolled and Attested.
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
	// Boots are the boots the node reported in its attestations, newest
	// first (at most MaxBoots). The boot ID and start time are quoted
	// claims: only the node's TPM can report a boot.
	// +optional
	// +listType=atomic
	Boots []Boot `json:"boots,omitempty"`
	// Sealing says when the KMS may Seal for the node, and which blobs it
	// sealed lately.
	// +optional
	Sealing *Sealing `json:"sealing,omitempty"`
	// UnexpectedUnseals are the latest key releases that no reported boot
	// explains (at most MaxUnexpectedUnseals), newest first.
	// +optional
	// +listType=atomic
	UnexpectedUnseals []Unseal `json:"unexpectedUnseals,omitempty"`
	// KeySalt is the node's random key salt, written by the KMS on the
	// node's first Seal. With the daemon's master key it derives the key that
	// opens the node's sealed blobs; alone it opens nothing. It lives in the
	// status because enrollment rewrites the spec; deleting the record
	// destroys it, and with it every key the node sealed.
	// +optional
	KeySalt []byte `json:"keySalt,omitempty"`
}

// Boot is one boot of the node, as its attestations reported it.
type Boot struct {
	// ID is the kernel's boot ID (/proc/sys/kernel/random/boot_id).
	ID string `json:"id"`
	// Started is when the boot began, by the node's clock.
	Started metav1.Time `json:"started"`
	// FirstAttested and LastAttested bound the attestations of this boot.
	FirstAttested metav1.Time `json:"firstAttested"`
	LastAttested  metav1.Time `json:"lastAttested"`
	// Result is the result of the boot's last attestation.
	Result string `json:"result"`
	// Passed is when an attestation of this boot first passed; unset while
	// none has. A boot that passed was sound when it unsealed: a later
	// failure (a policy added since) cuts it off but does not quarantine.
	// +optional
	Passed *metav1.Time `json:"passed,omitempty"`
}

// Sealing is the KMS's record of where it may Seal for a node.
type Sealing struct {
	// Window, while open, lets the KMS Seal for the node.
	// +optional
	Window *SealingWindow `json:"window,omitempty"`
	// FirstSealed and LastSealed are the times of the node's first and
	// latest Seal.
	// +optional
	FirstSealed *metav1.Time `json:"firstSealed,omitempty"`
	// +optional
	LastSealed *metav1.Time `json:"lastSealed,omitempty"`
	// Recent are the blobs sealed lately (at most MaxRecentSeals), newest
	// first: the first Unseal of a fresh blob is explained by its Seal.
	// +optional
	// +listType=atomic
	Recent []SealedBlob `json:"recent,omitempty"`
	// SaltReplaced is when the node's salt was last replaced (its machine
	// was wiped): every blob sealed before is dead.
	// +optional
	SaltReplaced *metav1.Time `json:"saltReplaced,omitempty"`
	// AdoptedFrom is the pending record whose salt and seals this record
	// adopted (its machine sealed, and opened, its volumes before it
	// enrolled). The KMS books that record's key releases to this one, so
	// that a boot which unsealed under it and then failed its attestation
	// quarantines this node as any other boot would.
	// +optional
	AdoptedFrom *AdoptedRecord `json:"adoptedFrom,omitempty"`
}

// AdoptedRecord names a pending record another record adopted.
type AdoptedRecord struct {
	// Name and UID are the pending record's.
	Name string    `json:"name"`
	UID  types.UID `json:"uid"`
	// At is when it was adopted.
	At metav1.Time `json:"at"`
}

// SealingWindow is a time in which the KMS Seals for a node.
type SealingWindow struct {
	// Reason is Enrollment, PreRegistration, Operator or Wipe.
	Reason string `json:"reason"`
	// Opened and Expires bound the window.
	Opened  metav1.Time `json:"opened"`
	Expires metav1.Time `json:"expires"`
	// By says who opened it.
	// +optional
	By string `json:"by,omitempty"`
	// Source, when set, is the only address Seals may come from.
	// +optional
	Source string `json:"source,omitempty"`
}

// SealedBlob is a blob the KMS sealed.
type SealedBlob struct {
	// Blob is the blob's fingerprint: the first 16 hex digits of its SHA-256.
	Blob string `json:"blob"`
	// At is when it was sealed.
	At metav1.Time `json:"at"`
	// Source is the address the Seal came from.
	Source string `json:"source"`
}

// Unseal is a key release.
type Unseal struct {
	// Blob is the blob's fingerprint.
	Blob string `json:"blob"`
	// Source is the address the Unseal came from.
	Source string `json:"source"`
	// At is when the KMS released the key.
	At metav1.MicroTime `json:"at"`
	// Count is how many calls this entry stands for (a caller's retries).
	Count int32 `json:"count"`
	// Reason says why no boot explains it.
	// +optional
	Reason string `json:"reason,omitempty"`
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
// +kubebuilder:printcolumn:name="Unexpected Unseal",type=string,JSONPath=`.status.conditions[?(@.type=="UnexpectedUnseal")].status`,priority=1
// +kubebuilder:printcolumn:name="Sealing Until",type=date,JSONPath=`.status.sealing.window.expires`,priority=1
// +kubebuilder:validation:XValidation:rule="(has(self.spec) && size(self.spec.ekHash) == 64 && self.metadata.name == 'ek-' + self.spec.ekHash.substring(0, 32)) || ((self.metadata.name.startsWith('kms-lab-') || self.metadata.name.startsWith('boot-')) && has(self.spec) && self.spec.ekHash == '0000000000000000000000000000000000000000000000000000000000000000')",message="metadata.name must be ek- and the first 32 hex digits of spec.ekHash: enrollment finds a node's record by that name, so a record under another name would never be used (sovrad ek-hash prints both); only sovrad's pending records (kms-lab-UUID, boot-UUID) hold the all-zero placeholder hash under another name"
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
