package kms

import (
	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/metrics"
)

// Label values of the KMS's metrics (package daemon/metrics declares them).
const (
	decisionAllowed = "allowed"
	decisionDenied  = "denied"
	writeOK         = "ok"
	writeError      = "error"
	verdictPending  = "Pending"
)

// zeroMetrics makes the series of rare events exist from the start, at
// zero, so that a dashboard shows "none" and not "no data", and rate()
// sees the first one.
func zeroMetrics() {
	for _, r := range []string{reasonUnexpectedNoBoot, reasonUnexpectedTwice, reasonUnexpectedTooLate, reasonUnexpectedConflict} {
		metrics.KMSUnexpectedReleases.WithLabelValues(r)
	}
	for _, r := range []string{ReasonUnexpectedUnseal, ReasonFailedAfterUnseal, ReasonEnrollmentMissed} {
		metrics.KMSQuarantines.WithLabelValues(r)
	}
	for _, r := range []string{v1alpha1.WindowOperator, v1alpha1.WindowWipe} {
		metrics.SealingWindowsOpened.WithLabelValues(r)
	}
	for _, v := range []string{v1alpha1.VerdictPending, v1alpha1.VerdictExplained, v1alpha1.VerdictUnexpected} {
		metrics.KMSLedgerEntries.WithLabelValues(verdictLabel(v))
	}
	for _, r := range []string{writeOK, writeError} {
		metrics.KMSLedgerWrites.WithLabelValues(r)
	}
	for _, op := range []string{opSeal, opUnseal, opVolumeKey} {
		metrics.KMSDecisions.WithLabelValues(op, decisionDenied, reasonRateLimited)
	}
}

// countDecision counts a key decision.
func countDecision(op string, allowed bool, reason string) {
	decision := decisionDenied
	if allowed {
		decision = decisionAllowed
	}
	metrics.KMSDecisions.WithLabelValues(op, decision, reason).Inc()
}

// verdictLabel is a ledger verdict as a label value.
func verdictLabel(v string) string {
	if v == v1alpha1.VerdictPending {
		return verdictPending
	}
	return v
}

// countEntries moves n ledger entries into (n > 0) or out of verdict v.
func countEntries(v string, n int) {
	metrics.KMSLedgerEntries.WithLabelValues(verdictLabel(v)).Add(float64(n))
}
