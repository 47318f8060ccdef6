package volumes_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/agent/controllers/ctest"
	ctrlvolumes "github.com/sovra-dev/sovra/agent/controllers/volumes"
	"github.com/sovra-dev/sovra/agent/resources/attestation"
	"github.com/sovra-dev/sovra/agent/resources/volumes"
	"github.com/sovra-dev/sovra/agent/runtime/clock"
	agentvolumes "github.com/sovra-dev/sovra/agent/volumes"
)

// fakePreparer records calls and fails the first failures of them.
type fakePreparer struct {
	mu       sync.Mutex // guards the fields below
	calls    []string
	failures int
}

func (f *fakePreparer) Prepare(_ context.Context, v agentvolumes.Volume, mapped string) (agentvolumes.Outcome, string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, v.ID+" "+mapped)
	if f.failures > 0 {
		f.failures--
		return "", "", errors.New("permission denied")
	}
	return agentvolumes.Formatted, "/dev/mapper/" + mapped, nil
}

func (f *fakePreparer) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.calls)
}

func status(phase attestation.Phase) *attestation.Status {
	s := attestation.NewStatus()
	s.TypedSpec().Phase = phase
	return s
}

func TestWaitsForAttestationThenPrepares(t *testing.T) {
	clk := clock.NewFake(time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC))
	fp := &fakePreparer{failures: 1}
	st := ctest.Start(t, &ctrlvolumes.VolumeController{
		Volumes:  []agentvolumes.Volume{{ID: "data", Device: "/dev/vdb1"}},
		Preparer: fp, MappedPrefix: "sovra-", Clock: clk, RetryInterval: time.Minute,
	})
	md := volumes.NewStatus("data").Metadata()

	// Before any attestation: no key is asked for.
	ctest.Put(t, st, status(attestation.PhaseEnrolling))
	ctest.WaitFor(t, st, md, func(s *volumes.Status) bool { return s.TypedSpec().Phase == volumes.PhaseWaiting })
	if fp.count() != 0 {
		t.Fatal("a key was asked for before attestation")
	}

	// Attested: the first try is refused, the retry succeeds.
	ctest.Put(t, st, status(attestation.PhaseAttested))
	ctest.WaitFor(t, st, md, func(s *volumes.Status) bool { return s.TypedSpec().Phase == volumes.PhaseFailed })
	for clk.Waiters() == 0 {
		time.Sleep(5 * time.Millisecond)
	}
	clk.Advance(time.Minute)
	got := ctest.WaitFor(t, st, md, func(s *volumes.Status) bool { return s.TypedSpec().Phase == volumes.PhaseReady })
	if got.TypedSpec().MappedPath != "/dev/mapper/sovra-data" || got.TypedSpec().Outcome != string(agentvolumes.Formatted) {
		t.Fatalf("ready status: %+v", got.TypedSpec())
	}

	// Ready stays ready: later attestations do not prepare it again.
	n := fp.count()
	ctest.Put(t, st, status(attestation.PhaseRefused))
	ctest.Put(t, st, status(attestation.PhaseAttested))
	time.Sleep(100 * time.Millisecond)
	if fp.count() != n {
		t.Fatal("a ready volume was prepared again")
	}
}
