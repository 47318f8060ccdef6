package hosts

import (
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
)

// TestAttestationRefusal: a claimed host's configuration is refused on a
// failed attestation for that reason, not as one too old.
func TestAttestationRefusal(t *testing.T) {
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	const maxAge = 15 * time.Minute
	rec := func(result string, attested bool, age time.Duration) *v1alpha1.SovraNode {
		n := &v1alpha1.SovraNode{}
		n.Status.LastAttestationResult, n.Status.Reason = result, v1alpha1.ReasonPolicyViolation
		if age >= 0 {
			at := metav1.NewTime(now.Add(-age))
			n.Status.LastAttestationTime = &at
		}
		status := metav1.ConditionFalse
		if attested {
			status = metav1.ConditionTrue
		}
		meta.SetStatusCondition(&n.Status.Conditions, metav1.Condition{Type: v1alpha1.ConditionAttested, Status: status, Reason: "Test"})
		return n
	}
	for _, tc := range []struct {
		name string
		rec  *v1alpha1.SovraNode
		want string
	}{
		{"a recent passing attestation", rec(v1alpha1.ResultPassed, true, time.Minute), ""},
		{"a failed attestation, however recent", rec(v1alpha1.ResultFailed, false, time.Second), reasonAttestationFailed},
		{"a failed attestation, old", rec(v1alpha1.ResultFailed, false, time.Hour), reasonAttestationFailed},
		{"no attestation since enrollment", rec("", false, -1), reasonNotAttested},
		{"a passing attestation too old", rec(v1alpha1.ResultPassed, true, time.Hour), reasonAttestationTooOld},
	} {
		reason, msg := attestationRefusal(tc.rec, now, maxAge)
		if reason != tc.want || (reason == "") != (msg == "") {
			t.Errorf("%s: %q %q, want reason %q", tc.name, reason, msg, tc.want)
		}
		if reason == reasonAttestationFailed && !strings.Contains(msg, "failed (PolicyViolation)") {
			t.Errorf("%s: message %q does not say the attestation failed and why", tc.name, msg)
		}
	}
}
