package attestation_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentattest "github.com/sovra-dev/sovra/agent/attest"
	ctrlattestation "github.com/sovra-dev/sovra/agent/controllers/attestation"
	"github.com/sovra-dev/sovra/agent/controllers/ctest"
	"github.com/sovra-dev/sovra/agent/daemonconn"
	"github.com/sovra-dev/sovra/agent/resources/attestation"
	"github.com/sovra-dev/sovra/agent/runtime/clock"
)

// fakeAttester answers from a script of attestation errors.
type fakeAttester struct {
	mu       sync.Mutex // guards the fields below
	enrolls  int
	attests  int
	failures []error // returned by successive Attest calls, then success
	clock    *clock.Fake
}

func (f *fakeAttester) Enroll(context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.enrolls++
	return nil
}

func (f *fakeAttester) Attest(context.Context) (*agentattest.Credential, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.attests++
	if len(f.failures) > 0 {
		err := f.failures[0]
		f.failures = f.failures[1:]
		return nil, err
	}
	return &agentattest.Credential{Expires: f.clock.Now().Add(time.Hour)}, nil
}

func (f *fakeAttester) NodeName() string { return "ek-test" }

func (f *fakeAttester) counts() (int, int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.enrolls, f.attests
}

func noSleep(context.Context, time.Duration) error { return nil }

func TestAttestsOnStartAndEveryInterval(t *testing.T) {
	clk := clock.NewFake(time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC))
	fa := &fakeAttester{clock: clk}
	st := ctest.Start(t, &ctrlattestation.AttestationController{
		Attester: fa, Clock: clk, Interval: 10 * time.Minute, Backoff: daemonconn.Backoff{Sleep: noSleep},
	})
	ptr := attestation.NewStatus().Metadata()
	ctest.WaitFor(t, st, ptr, func(s *attestation.Status) bool { return s.TypedSpec().Phase == attestation.PhaseAttested })
	waitWaiter(t, clk)
	clk.Advance(10 * time.Minute)
	waitFor(t, func() bool { _, a := fa.counts(); return a == 2 })
	if e, _ := fa.counts(); e != 1 {
		t.Fatalf("enrolled %d times, want once", e)
	}
}

func TestRetriesUnreachableAndReenrollsUnknownNode(t *testing.T) {
	clk := clock.NewFake(time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC))
	fa := &fakeAttester{clock: clk, failures: []error{
		status.Error(codes.Unavailable, "daemon down"),
		status.Error(codes.NotFound, "node is not enrolled; enroll first"),
	}}
	st := ctest.Start(t, &ctrlattestation.AttestationController{
		Attester: fa, Clock: clk, Interval: time.Hour, Backoff: daemonconn.Backoff{Sleep: noSleep},
	})
	// Unavailable is retried at once; NotFound re-enrolls without waiting.
	ctest.WaitFor(t, st, attestation.NewStatus().Metadata(), func(s *attestation.Status) bool {
		return s.TypedSpec().Phase == attestation.PhaseAttested
	})
	if e, a := fa.counts(); e != 2 || a != 3 {
		t.Fatalf("enrolls %d attests %d, want 2 and 3", e, a)
	}
}

func TestRefusalIsReported(t *testing.T) {
	clk := clock.NewFake(time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC))
	fa := &fakeAttester{clock: clk, failures: []error{status.Error(codes.PermissionDenied, "attestation: refused: policy violated")}}
	st := ctest.Start(t, &ctrlattestation.AttestationController{
		Attester: fa, Clock: clk, Backoff: daemonconn.Backoff{Sleep: noSleep},
	})
	s := ctest.WaitFor(t, st, attestation.NewStatus().Metadata(), func(s *attestation.Status) bool {
		return s.TypedSpec().Phase == attestation.PhaseRefused
	})
	if _, a := fa.counts(); a != 1 {
		t.Fatalf("a refusal was retried at once (%d attempts): it must wait for the interval", a)
	}
	t.Logf("status: %+v", s.TypedSpec())
}

func waitWaiter(t *testing.T, clk *clock.Fake) {
	t.Helper()
	waitFor(t, func() bool { return clk.Waiters() > 0 })
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
		time.Sleep(time.Millisecond)
	}
}
