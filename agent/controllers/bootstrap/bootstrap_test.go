package bootstrap_test

import (
	"context"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cosi-project/runtime/pkg/state"

	bootstrapctrl "github.com/sovra-dev/sovra/agent/controllers/bootstrap"
	"github.com/sovra-dev/sovra/agent/controllers/ctest"
	"github.com/sovra-dev/sovra/agent/resources/bootstrap"
	"github.com/sovra-dev/sovra/agent/resources/election"
	"github.com/sovra-dev/sovra/agent/resources/node"
	"github.com/sovra-dev/sovra/agent/runtime/clock"
)

// fakeTalos records Bootstrap calls and reports etcd members per address.
type fakeTalos struct {
	mu         sync.Mutex // guards the fields below
	bootstraps []netip.Addr
	members    map[netip.Addr]int
	already    bool
}

func (f *fakeTalos) Bootstrap(_ context.Context, addr netip.Addr) error {
	f.mu.Lock()
	defer f.mu.Unlock()

	f.bootstraps = append(f.bootstraps, addr)
	if f.already {
		return bootstrapctrl.ErrAlreadyBootstrapped
	}

	return nil
}

func (f *fakeTalos) EtcdMembers(_ context.Context, addr netip.Addr) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()

	return f.members[addr], nil
}

func (f *fakeTalos) calls() []netip.Addr {
	f.mu.Lock()
	defer f.mu.Unlock()

	return append([]netip.Addr(nil), f.bootstraps...)
}

// harness drives one BootstrapController.
type harness struct {
	t  *testing.T
	st state.State
}

func setup(t *testing.T, talos *fakeTalos, lease bootstrapctrl.BootstrapLease, clk clock.Clock, controlPlane bool) harness {
	t.Helper()

	st := ctest.Start(t, &bootstrapctrl.BootstrapController{Talos: talos, Lease: lease, Clock: clk, PollInterval: time.Second})

	role := node.NewRole()
	role.TypedSpec().ControlPlane = controlPlane
	ctest.Put(t, st, role)

	return harness{t: t, st: st}
}

// put publishes an election result.
func (h harness) put(spec election.ElectionSpec) {
	e := election.NewElection()
	*e.TypedSpec() = spec
	ctest.Put(h.t, h.st, e)
}

// wait waits for the bootstrap phase.
func (h harness) wait(phase bootstrap.Phase) {
	ctest.WaitFor(h.t, h.st, bootstrap.NewStatus().Metadata(), func(s *bootstrap.Status) bool { return s.TypedSpec().Phase == phase })
}

func TestLeaderBootstrapsSelfOnce(t *testing.T) {
	talos := &fakeTalos{}
	h := setup(t, talos, nil, clock.Real{}, true)

	h.put(election.ElectionSpec{Round: 3, Self: "10.0.0.1", Leader: "10.0.0.1", Decision: election.DecisionLeader})
	h.wait(bootstrap.PhaseBootstrapped)

	// Another round with the same decision does nothing more.
	h.put(election.ElectionSpec{Round: 4, Self: "10.0.0.1", Leader: "10.0.0.1", Decision: election.DecisionLeader})
	time.Sleep(50 * time.Millisecond)

	if got := talos.calls(); len(got) != 1 || got[0] != netip.MustParseAddr("10.0.0.1") {
		t.Fatalf("bootstrap calls %v", got)
	}
}

func TestAlreadyExistsIsSuccess(t *testing.T) {
	h := setup(t, &fakeTalos{already: true}, nil, clock.Real{}, true)

	h.put(election.ElectionSpec{Round: 2, Self: "10.0.0.1", Leader: "10.0.0.1", Decision: election.DecisionLeader})
	h.wait(bootstrap.PhaseBootstrapped)
}

func TestFollowerWaitsForEtcdOnLeader(t *testing.T) {
	talos := &fakeTalos{members: map[netip.Addr]int{}}
	clk := clock.NewFake(time.Unix(0, 0))
	h := setup(t, talos, nil, clk, true)

	h.put(election.ElectionSpec{Round: 2, Self: "10.0.0.2", Leader: "10.0.0.1", Decision: election.DecisionFollower})
	h.wait(bootstrap.PhaseFollowing)

	talos.mu.Lock()
	talos.members[netip.MustParseAddr("10.0.0.1")] = 1
	talos.mu.Unlock()

	go func() {
		for range 100 {
			time.Sleep(5 * time.Millisecond)
			clk.Advance(time.Second)
		}
	}()

	h.wait(bootstrap.PhaseJoined)

	if len(talos.calls()) != 0 {
		t.Fatal("a follower called Bootstrap")
	}
}

func TestEtcdExistsEndsThePath(t *testing.T) {
	talos := &fakeTalos{}
	h := setup(t, talos, nil, clock.Real{}, true)

	h.put(election.ElectionSpec{Round: 1, Self: "10.0.0.4", Decision: election.DecisionEtcdExists, EtcdPeer: "10.0.0.1"})
	h.wait(bootstrap.PhaseAlreadyBootstrapped)

	if len(talos.calls()) != 0 {
		t.Fatal("bootstrapped although etcd exists")
	}
}

func TestWorkerLeavesThePath(t *testing.T) {
	h := setup(t, &fakeTalos{}, nil, clock.Real{}, false)
	h.wait(bootstrap.PhaseNotParticipating)
}

// deniedLease never grants the lease.
type deniedLease struct{}

func (deniedLease) Acquire(context.Context, string) (bool, error) { return false, nil }

func (deniedLease) Commit(context.Context, string) (bool, error) { return false, nil }

func (deniedLease) Complete(context.Context, string) error { return nil }

func TestLeaseMustBeWon(t *testing.T) {
	talos := &fakeTalos{}
	h := setup(t, talos, deniedLease{}, clock.Real{}, true)

	h.put(election.ElectionSpec{Round: 2, Self: "10.0.0.1", Leader: "10.0.0.1", Decision: election.DecisionLeader})
	time.Sleep(100 * time.Millisecond)

	if len(talos.calls()) != 0 {
		t.Fatal("bootstrapped without the lease")
	}
}

// scriptedLease grants Acquire, answers Commit with commit, and records the
// calls.
type scriptedLease struct {
	commit bool
	mu     sync.Mutex // guards log
	log    []string
}

func (l *scriptedLease) record(s string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.log = append(l.log, s)
}

func (l *scriptedLease) calls() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.log, ",")
}

func (l *scriptedLease) Acquire(_ context.Context, h string) (bool, error) {
	l.record("acquire " + h)
	return true, nil
}

func (l *scriptedLease) Commit(_ context.Context, h string) (bool, error) {
	l.record("commit " + h)
	return l.commit, nil
}

func (l *scriptedLease) Complete(_ context.Context, h string) error {
	l.record("complete " + h)
	return nil
}

func TestLeaseLostBeforeCommitDoesNotBootstrap(t *testing.T) {
	talos := &fakeTalos{}
	lease := &scriptedLease{commit: false}
	h := setup(t, talos, lease, clock.Real{}, true)

	h.put(election.ElectionSpec{Round: 2, Self: "10.0.0.1", Leader: "10.0.0.1", Decision: election.DecisionLeader})
	time.Sleep(100 * time.Millisecond)

	if len(talos.calls()) != 0 || !strings.HasPrefix(lease.calls(), "acquire 10.0.0.1,commit 10.0.0.1") {
		t.Fatalf("bootstrap calls %v, lease calls %s: want no bootstrap after a lost commit", talos.calls(), lease.calls())
	}
}

func TestLeaseCommittedThenCompleted(t *testing.T) {
	talos := &fakeTalos{}
	lease := &scriptedLease{commit: true}
	h := setup(t, talos, lease, clock.Real{}, true)

	h.put(election.ElectionSpec{Round: 2, Self: "10.0.0.1", Leader: "10.0.0.1", Decision: election.DecisionLeader})
	h.wait(bootstrap.PhaseBootstrapped)

	if len(talos.calls()) != 1 || lease.calls() != "acquire 10.0.0.1,commit 10.0.0.1,complete 10.0.0.1" {
		t.Fatalf("bootstrap calls %v, lease calls %s", talos.calls(), lease.calls())
	}
}
