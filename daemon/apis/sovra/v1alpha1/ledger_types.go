package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// LabelReplica labels an UnsealLedger with the replica that writes it.
const LabelReplica = "sovra.dev/replica"

// Verdicts of a ledger entry.
const (
	// VerdictPending: no reported boot explains the release yet.
	VerdictPending = ""
	// VerdictExplained: a boot the node reported, or a fresh Seal, explains it.
	VerdictExplained = "Explained"
	// VerdictUnexpected: nothing explains it; the record says so.
	VerdictUnexpected = "Unexpected"
)

// LedgerEntry is one key release (an allowed Unseal, with the caller's
// retries folded in).
type LedgerEntry struct {
	// ID is unique among the replica's entries.
	ID string `json:"id"`
	// Node and NodeUID name the record the key was released for.
	Node    string    `json:"node"`
	NodeUID types.UID `json:"nodeUID"`
	// Blob is the fingerprint of the blob (first 16 hex digits of its SHA-256).
	Blob string `json:"blob"`
	// Source is the address the Unseal came from.
	Source string `json:"source"`
	// At is the time of the first call; Last of the latest retry.
	At   metav1.MicroTime `json:"at"`
	Last metav1.MicroTime `json:"last"`
	// Count is the number of calls.
	Count int32 `json:"count"`
	// Verdict is empty while pending, then Explained or Unexpected.
	// +optional
	Verdict string `json:"verdict,omitempty"`
	// Boot is the boot ID that explains it, or why nothing does.
	// +optional
	Boot string `json:"boot,omitempty"`
}

// UnsealLedgerSpec is a segment of one replica's key releases.
type UnsealLedgerSpec struct {
	// Replica is the daemon replica that released the keys.
	Replica string `json:"replica"`
	// Entries are the releases, oldest first.
	// +listType=atomic
	Entries []LedgerEntry `json:"entries"`
}

// UnsealLedger is a segment of the key releases one daemon replica made: the
// KMS writes every allowed Unseal here in batches (not one API write per
// call), judges each against the boots its node reported, and keeps the
// segment until the releases can no longer be judged again. Every replica
// reads every ledger, so a blob opened through two replicas in one boot is
// seen.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster
// +kubebuilder:printcolumn:name="Replica",type=string,JSONPath=`.spec.replica`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type UnsealLedger struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec UnsealLedgerSpec `json:"spec"`
}

// UnsealLedgerList is a list of UnsealLedgers.
//
// +kubebuilder:object:root=true
type UnsealLedgerList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []UnsealLedger `json:"items"`
}
