package kms

import (
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
	// ConditionQuarantined is True while the node may not Unseal: it
	// unsealed and then failed or missed attestation (or, in lab mode, never
	// enrolled). Only an operator clears it, with AnnotationClearQuarantine.
	ConditionQuarantined = "Quarantined"
	// AnnotationReleasedAt is the time (RFC 3339, UTC) of the Unseal that
	// started the node's attestation deadline; removed once it attests.
	AnnotationReleasedAt = "kms.sovra.dev/released-at"
	// AnnotationClearQuarantine, set to any value by an operator
	// (kubectl annotate snode NAME kms.sovra.dev/clear-quarantine=yes),
	// lifts the quarantine; the KMS then removes it.
	AnnotationClearQuarantine = "kms.sovra.dev/clear-quarantine"
	// LabelLabPending marks a record the KMS created in lab mode for a node
	// that sealed before it enrolled; its salt moves to the node's enrolled
	// record when one claims the same UUID.
	LabelLabPending = "kms.sovra.dev/lab-pending"
	// labNamePrefix prefixes the names of lab records.
	labNamePrefix = "kms-lab-"
	// placeholderEKHash fills the required EK hash of a lab record: no TPM
	// has it, so no enrollment can match the record by name.
	placeholderEKHash = "0000000000000000000000000000000000000000000000000000000000000000"
)

// Reasons of the Quarantined condition.
const (
	ReasonFailedAfterUnseal = "AttestationFailedAfterUnseal"
	ReasonDeadlineMissed    = "AttestationDeadlineMissed"
	ReasonEnrollmentMissed  = "EnrollmentDeadlineMissed"
	ReasonQuarantineCleared = "ClearedByOperator"
)

const (
	// maxUUIDLen bounds a node UUID (Talos sends 36 characters).
	maxUUIDLen = 64
	// releasedAtTimeFormat formats AnnotationReleasedAt.
	releasedAtTimeFormat = time.RFC3339Nano
	// attestationTimeGranule is the precision of stored attestation times.
	attestationTimeGranule = time.Second
)

// uuidPattern is what a node UUID may look like: SMBIOS UUIDs are hex and
// dashes; anything else is refused before it reaches a log or a name.
var uuidPattern = regexp.MustCompile(`^[0-9a-zA-Z]([0-9a-zA-Z-]{0,62}[0-9a-zA-Z])?$`)

func validUUID(u string) bool { return len(u) <= maxUUIDLen && uuidPattern.MatchString(u) }

// labName is the record name of a lab node.
func labName(uuid string) string { return labNamePrefix + strings.ToLower(uuid) }

func isLab(n *v1alpha1.SovraNode) bool { return n.Labels[LabelLabPending] == "true" }

func conditionTrue(n *v1alpha1.SovraNode, typ string) bool {
	return meta.IsStatusConditionTrue(n.Status.Conditions, typ)
}

func quarantined(n *v1alpha1.SovraNode) bool { return conditionTrue(n, ConditionQuarantined) }

func enrolled(n *v1alpha1.SovraNode) bool {
	return !isLab(n) && conditionTrue(n, v1alpha1.ConditionEnrolled)
}

func attestedOK(n *v1alpha1.SovraNode) bool {
	return n.Status.LastAttestationResult == v1alpha1.ResultPassed &&
		conditionTrue(n, v1alpha1.ConditionAttested)
}

// knowsAddress reports whether a is one of the node's known addresses.
func knowsAddress(n *v1alpha1.SovraNode, a netip.Addr) bool {
	for _, s := range n.Spec.Addresses {
		if b, err := netip.ParseAddr(s); err == nil && b.Unmap() == a {
			return true
		}
	}
	return false
}

// releasedAt is the start of the node's attestation deadline, if any.
func releasedAt(n *v1alpha1.SovraNode) (time.Time, bool) {
	v, ok := n.Annotations[AnnotationReleasedAt]
	if !ok {
		return time.Time{}, false
	}
	t, err := time.Parse(releasedAtTimeFormat, v)
	return t, err == nil
}

// attestedSince reports the node's last attestation if it was judged after
// t. Attestation times are stored to the second, so only a later second
// counts: an attestation in the second of the Unseal may have preceded it.
func attestedSince(n *v1alpha1.SovraNode, t time.Time) (passed, judged bool) {
	lt := n.Status.LastAttestationTime
	if lt == nil || !lt.Time.After(t.Truncate(attestationTimeGranule)) {
		return false, false
	}
	return n.Status.LastAttestationResult == v1alpha1.ResultPassed, true
}

func setQuarantine(n *v1alpha1.SovraNode, on bool, reason, msg string, now time.Time) {
	status := metav1.ConditionFalse
	if on {
		status = metav1.ConditionTrue
	}
	meta.SetStatusCondition(&n.Status.Conditions, metav1.Condition{
		Type: ConditionQuarantined, Status: status, Reason: reason, Message: msg,
		LastTransitionTime: metav1.NewTime(now), ObservedGeneration: n.Generation,
	})
}

// annotationPatch is a JSON merge patch of metadata.annotations.
func annotationPatch(set map[string]*string) ([]byte, error) {
	b, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": set}})
	if err != nil {
		return nil, fmt.Errorf("encoding annotation patch: %w", err)
	}
	return b, nil
}

// pick chooses the record a call about one UUID is judged on. Several
// records may claim a UUID (a lab record and the node's enrolled record
// while its salt moves; or a second TPM claiming someone else's UUID). The
// record holding a salt wins, since only it opens anything; among several
// such, a non-lab record; without a salt, the only non-lab record. Anything
// else is ambiguous and refused.
func pick(cands []*v1alpha1.SovraNode) (*v1alpha1.SovraNode, bool) {
	if len(cands) == 1 {
		return cands[0], true
	}
	var salted, nonLab, saltedNonLab []*v1alpha1.SovraNode
	for _, c := range cands {
		has := len(c.Status.KeySalt) > 0
		if has {
			salted = append(salted, c)
		}
		if !isLab(c) {
			nonLab = append(nonLab, c)
			if has {
				saltedNonLab = append(saltedNonLab, c)
			}
		}
	}
	switch {
	case len(salted) == 1:
		return salted[0], true
	case len(salted) > 1 && len(saltedNonLab) == 1:
		return saltedNonLab[0], true
	case len(salted) == 0 && len(nonLab) == 1:
		return nonLab[0], true
	}
	return nil, false
}
