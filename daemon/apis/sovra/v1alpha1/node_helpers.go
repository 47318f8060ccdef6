package v1alpha1

import "k8s.io/apimachinery/pkg/api/meta"

// Enrolled reports whether the node's AK was activated against its EK.
func (n *SovraNode) Enrolled() bool {
	return meta.IsStatusConditionTrue(n.Status.Conditions, ConditionEnrolled)
}

// AttestedOK reports whether the node's last attestation passed.
func (n *SovraNode) AttestedOK() bool {
	return n.Status.LastAttestationResult == ResultPassed &&
		meta.IsStatusConditionTrue(n.Status.Conditions, ConditionAttested)
}

// Quarantined reports whether the node is quarantined.
func (n *SovraNode) Quarantined() bool {
	return meta.IsStatusConditionTrue(n.Status.Conditions, ConditionQuarantined)
}

// CurrentBoot is the node's latest reported boot, nil before any.
func (n *SovraNode) CurrentBoot() *Boot {
	if len(n.Status.Boots) == 0 {
		return nil
	}
	return &n.Status.Boots[0]
}
