package attestation

import (
	"context"
	"testing"

	"go.uber.org/zap/zaptest"
	k8smetrics "k8s.io/component-base/metrics"
	"k8s.io/component-base/metrics/testutil"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/metrics"
	"github.com/sovra-dev/sovra/internal/attest"
)

// counter reads one series of a counter vector.
func counter(t *testing.T, vec *k8smetrics.CounterVec, labels ...string) func() float64 {
	return func() float64 {
		t.Helper()
		v, err := testutil.GetCounterMetricValue(vec.WithLabelValues(labels...))
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}

// TestVerdictsAreCounted: an enrollment, a refused one, a passing
// attestation and a replay are each counted once, under their labels.
func TestVerdictsAreCounted(t *testing.T) {
	e := newEnv(t, zaptest.NewLogger(t))
	ctx := context.Background()
	enrolled := counter(t, metrics.Enrollments, outcomeEnrolled, attest.EKByCertificate)
	refused := counter(t, metrics.Enrollments, outcomeRefused, attest.EKByCertificate)
	windows := counter(t, metrics.SealingWindowsOpened, v1alpha1.WindowEnrollment)
	passed := counter(t, metrics.Attestations, resultPassed, v1alpha1.ReasonAttestationPassed)
	rejected := counter(t, metrics.Attestations, resultRejected, v1alpha1.ReasonEvidenceRejected)
	before := []float64{enrolled(), refused(), windows(), passed(), rejected()}

	en, _, err := e.svc.BeginEnrollment(ctx, e.enrollRequest())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.svc.FinishEnrollment(ctx, en, make([]byte, 32)); err == nil {
		t.Fatal("a wrong answer enrolled")
	}
	n := e.enroll(t)
	if _, err := e.svc.Attest(ctx, e.attestRequest(n.Name)); err != nil {
		t.Fatal(err)
	}
	if _, err := e.svc.Attest(ctx, e.attestRequest(n.Name)); err == nil {
		t.Fatal("a replay passed")
	}
	after := []float64{enrolled(), refused(), windows(), passed(), rejected()}
	for i, name := range []string{"enrolled", "refused", "enrollment windows", "passed", "rejected"} {
		if after[i]-before[i] != 1 {
			t.Errorf("%s counted %v times, want 1", name, after[i]-before[i])
		}
	}
}
