package attestation

import (
	"errors"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/metrics"
	"github.com/sovra-dev/sovra/internal/attest"
)

// Label values of the attestation metrics (package daemon/metrics declares
// them).
const (
	outcomeEnrolled = "enrolled"
	outcomeRefused  = "refused"
	outcomeInvalid  = "invalid"
	outcomeRetry    = "retry"
	outcomeError    = "error"
	// methodNone is the method of an enrollment whose EK was not admitted.
	methodNone = "None"

	resultPassed   = "passed"
	resultFailed   = "failed"
	resultRejected = "rejected"
	// reasonPolicyWarnings is a passing attestation that broke Warn rules.
	reasonPolicyWarnings = "PolicyWarnings"
)

// zeroMetrics makes the series of the verdicts exist from the start, at
// zero, so that a dashboard shows "none" and not "no data".
func zeroMetrics() {
	for _, r := range [][2]string{
		{resultPassed, v1alpha1.ReasonAttestationPassed}, {resultPassed, reasonPolicyWarnings},
		{resultFailed, v1alpha1.ReasonPolicyViolation}, {resultFailed, v1alpha1.ReasonEventLogMismatch},
		{resultRejected, v1alpha1.ReasonEvidenceRejected},
	} {
		metrics.Attestations.WithLabelValues(r[0], r[1])
	}
	for _, m := range []string{attest.EKByCertificate, attest.EKByAllowList, attest.EKByTOFU} {
		metrics.Enrollments.WithLabelValues(outcomeEnrolled, m)
	}
	metrics.Enrollments.WithLabelValues(outcomeRefused, methodNone)
	metrics.SealingWindowsOpened.WithLabelValues(v1alpha1.WindowEnrollment)
}

// countEnrollment counts an enrollment that ended with err (nil: enrolled)
// for an EK admitted by method.
func countEnrollment(method string, err error) {
	outcome := outcomeEnrolled
	switch {
	case err == nil:
	case errors.Is(err, ErrRefused):
		outcome = outcomeRefused
	case errors.Is(err, ErrInvalid):
		outcome = outcomeInvalid
	case errors.Is(err, ErrConflict):
		outcome = outcomeRetry
	default:
		outcome = outcomeError
	}
	if method == "" {
		method = methodNone
	}
	metrics.Enrollments.WithLabelValues(outcome, method).Inc()
}

// countVerdict counts an attestation verdict.
func countVerdict(result, reason string) {
	metrics.Attestations.WithLabelValues(result, reason).Inc()
}
