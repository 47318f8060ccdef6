package kms

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/netip"
	"regexp"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
)

// What the KMS keeps on a SovraNode besides its key salt.
const (
	// ConditionQuarantined is the node's quarantine (v1alpha1).
	ConditionQuarantined = v1alpha1.ConditionQuarantined
	// AnnotationClearQuarantine, set to any value by an operator
	// (kubectl annotate snode NAME kms.sovra.dev/clear-quarantine=yes),
	// lifts the quarantine; the KMS then removes it.
	AnnotationClearQuarantine = "kms.sovra.dev/clear-quarantine"
	// AnnotationClearUnexpectedUnseal, set by an operator who looked into
	// an unexpected key release, clears the UnexpectedUnseal condition and
	// list; the KMS then removes it.
	AnnotationClearUnexpectedUnseal = "kms.sovra.dev/clear-unexpected-unseal"
	// AnnotationSealingWindow, set by an operator to a duration (kubectl
	// annotate snode NAME kms.sovra.dev/sealing-window=30m), opens a
	// sealing window for that long (at most MaxSealingWindow); the KMS then
	// removes it, records the window and says so in an event.
	AnnotationSealingWindow = "kms.sovra.dev/sealing-window"
	// LabelLabPending marks a lab record (v1alpha1).
	LabelLabPending = v1alpha1.LabelLabPending
	// labNamePrefix prefixes the names of lab records.
	labNamePrefix = "kms-lab-"
	// placeholderEKHash fills the required EK hash of a lab record: no TPM
	// has it, so no enrollment can match the record by name. The
	// SovraNode CRD's name rule admits a name other than ek-HASH (a lab
	// record's kms-lab-UUID, a boot-config fetch's boot-UUID) only with
	// this hash; keep the two in step.
	placeholderEKHash = "0000000000000000000000000000000000000000000000000000000000000000"
)

// Reasons of the Quarantined and UnexpectedUnseal conditions.
const (
	ReasonFailedAfterUnseal  = "AttestationFailedAfterUnseal"
	ReasonUnexpectedUnseal   = "UnexpectedUnseal"
	ReasonEnrollmentMissed   = "EnrollmentDeadlineMissed"
	ReasonQuarantineCleared  = "ClearedByOperator"
	reasonUnexpectedNoBoot   = "NoReportedBootExplainsIt"
	reasonUnexpectedTwice    = "ReleasedAgainInOneBoot"
	reasonUnexpectedTooLate  = "ReleasedLateInItsBoot"
	reasonUnexpectedConflict = "ReleasedToAnotherSource"
)

const (
	// maxUUIDLen bounds a node UUID (Talos sends 36 characters).
	maxUUIDLen = 64
	// blobFingerprintLen is the hex digits of a blob's SHA-256 kept.
	blobFingerprintLen = 16
)

// uuidPattern is what a node UUID may look like: SMBIOS UUIDs are hex and
// dashes; anything else is refused before it reaches a log or a name.
var uuidPattern = regexp.MustCompile(`^[0-9a-zA-Z]([0-9a-zA-Z-]{0,62}[0-9a-zA-Z])?$`)

func validUUID(u string) bool { return len(u) <= maxUUIDLen && uuidPattern.MatchString(u) }

// labName is the record name of a lab node.
func labName(uuid string) string { return labNamePrefix + strings.ToLower(uuid) }

func isLab(n *v1alpha1.SovraNode) bool { return n.Labels[LabelLabPending] == "true" }

// expected reports whether n is the pending record of a machine that fetched
// its enrollment configuration (Expect), as opposed to a lab record: only
// such a machine opens, before it enrolls, what it has just sealed.
func expected(n *v1alpha1.SovraNode) bool {
	return isLab(n) && strings.HasPrefix(n.Name, pendingNamePrefix)
}

func conditionTrue(n *v1alpha1.SovraNode, typ string) bool {
	return meta.IsStatusConditionTrue(n.Status.Conditions, typ)
}

func quarantined(n *v1alpha1.SovraNode) bool { return n.Quarantined() }

func enrolled(n *v1alpha1.SovraNode) bool { return !isLab(n) && n.Enrolled() }

func attestedOK(n *v1alpha1.SovraNode) bool { return n.AttestedOK() }

// knowsAddress reports whether a is one of the node's known addresses.
func knowsAddress(n *v1alpha1.SovraNode, a netip.Addr) bool {
	for _, s := range n.Spec.Addresses {
		if b, err := netip.ParseAddr(s); err == nil && b.Unmap() == a {
			return true
		}
	}
	return false
}

// fingerprint names a blob in the ledger and the record: the first 16 hex
// digits of its SHA-256. A blob is ciphertext; its hash reveals nothing.
func fingerprint(blob []byte) string {
	sum := sha256.Sum256(blob)
	return hex.EncodeToString(sum[:])[:blobFingerprintLen]
}

func setCondition(n *v1alpha1.SovraNode, typ string, on bool, reason, msg string, now time.Time) {
	status := metav1.ConditionFalse
	if on {
		status = metav1.ConditionTrue
	}
	meta.SetStatusCondition(&n.Status.Conditions, metav1.Condition{
		Type: typ, Status: status, Reason: reason, Message: msg,
		LastTransitionTime: metav1.NewTime(now), ObservedGeneration: n.Generation,
	})
}

func setQuarantine(n *v1alpha1.SovraNode, on bool, reason, msg string, now time.Time) {
	setCondition(n, ConditionQuarantined, on, reason, msg, now)
}

// annotationPatch is a JSON merge patch of metadata.annotations.
func annotationPatch(set map[string]*string) ([]byte, error) {
	b, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": set}})
	if err != nil {
		return nil, fmt.Errorf("encoding annotation patch: %w", err)
	}
	return b, nil
}

// resolve returns the record a call about uuid is judged on: the record
// the UUID's claim names (that instance of it), and only for a UUID nobody
// claimed (a record an operator made, which the sweeper claims within a
// second) the one record that names the UUID. Anything else is nobody's.
func resolve(st Store, uuid string) *v1alpha1.SovraNode {
	if c := st.Claim(uuid); c != nil {
		rec := st.Node(c.Spec.Node)
		if rec == nil || (c.Spec.NodeUID != "" && rec.UID != c.Spec.NodeUID) {
			return nil
		}
		return rec
	}
	cands := st.ByUUID(uuid)
	if len(cands) == 1 {
		return cands[0]
	}
	return nil
}
