package discovery_test

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/agent/controllers/ctest"
	discoveryctrl "github.com/sovra-dev/sovra/agent/controllers/discovery"
	"github.com/sovra-dev/sovra/agent/resources/bootstrap"
	"github.com/sovra-dev/sovra/agent/resources/discovery"
	"github.com/sovra-dev/sovra/agent/resources/node"
	"github.com/sovra-dev/sovra/agent/runtime/clock"
)

type staticSource []netip.Addr

func (s staticSource) Peers(context.Context) ([]netip.Addr, error) { return s, nil }

// fakeProber answers from a table; addresses not in it are unverified.
type fakeProber struct {
	mu    sync.Mutex // guards peers
	peers map[netip.Addr]discovery.PeerSpec
}

func (p *fakeProber) Probe(_ context.Context, addr netip.Addr) (discovery.PeerSpec, error) {
	p.mu.Lock()
	defer p.mu.Unlock()

	spec, ok := p.peers[addr]
	if !ok {
		return spec, fmt.Errorf("probing %s: %w", addr, discoveryctrl.ErrUnverified)
	}

	return spec, nil
}

func (p *fakeProber) remove(addr netip.Addr) {
	p.mu.Lock()
	defer p.mu.Unlock()

	delete(p.peers, addr)
}

var (
	a1 = netip.MustParseAddr("10.0.0.1")
	a2 = netip.MustParseAddr("10.0.0.2")
	a3 = netip.MustParseAddr("10.0.0.3")
	a9 = netip.MustParseAddr("10.0.0.9")
)

func waitForTimer(t *testing.T, f *clock.Fake) {
	t.Helper()

	deadline := time.Now().Add(10 * time.Second)
	for f.Waiters() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("controller never waited on the clock")
		}

		time.Sleep(time.Millisecond)
	}
}

func TestScanRoundsUntilBootstrapFinal(t *testing.T) {
	prober := &fakeProber{peers: map[netip.Addr]discovery.PeerSpec{
		a1: {ControlPlane: true, BootTime: 1},
		a2: {ControlPlane: true, BootTime: 2},
		a3: {ControlPlane: true, BootTime: 3},
	}}
	clk := clock.NewFake(time.Unix(0, 0))

	st := ctest.Start(t, &discoveryctrl.ScanController{
		Source: staticSource{a2, a3, a9}, Prober: prober, Self: a1, Clock: clk, Interval: time.Second,
	})

	role := node.NewRole()
	role.TypedSpec().ControlPlane = true
	ctest.Put(t, st, role)

	r := ctest.WaitFor(t, st, discovery.NewRound().Metadata(), func(r *discovery.Round) bool { return r.TypedSpec().Number == 1 })
	if got := r.TypedSpec(); len(got.Peers) != 3 || got.Unverified != 1 || got.Self != "10.0.0.1" || !got.Peers[0].Self {
		t.Fatalf("round 1: %+v", got)
	}

	ctest.WaitFor(t, st, discovery.NewPeer("10.0.0.3").Metadata(), func(*discovery.Peer) bool { return true })

	// Node 3 disappears: its Peer goes away in the next round.
	prober.remove(a3)
	waitForTimer(t, clk)
	clk.Advance(time.Second)

	r = ctest.WaitFor(t, st, discovery.NewRound().Metadata(), func(r *discovery.Round) bool { return r.TypedSpec().Number == 2 })
	if len(r.TypedSpec().Peers) != 2 {
		t.Fatalf("round 2: %+v", r.TypedSpec())
	}

	// The bootstrap path ends: no more rounds.
	status := bootstrap.NewStatus()
	status.TypedSpec().Phase = bootstrap.PhaseJoined
	ctest.Put(t, st, status)
	time.Sleep(100 * time.Millisecond)
	clk.Advance(time.Hour)
	time.Sleep(100 * time.Millisecond)

	r = ctest.WaitFor(t, st, discovery.NewRound().Metadata(), func(*discovery.Round) bool { return true })
	if r.TypedSpec().Number != 2 {
		t.Fatalf("discovery continued after the bootstrap path ended: round %d", r.TypedSpec().Number)
	}
}

func TestWorkerDoesNotScan(t *testing.T) {
	src := &countingSource{}
	clk := clock.NewFake(time.Unix(0, 0))

	st := ctest.Start(t, &discoveryctrl.ScanController{Source: src, Prober: &fakeProber{}, Self: a1, Clock: clk, Interval: time.Second})

	role := node.NewRole()
	role.TypedSpec().MachineType = "worker"
	ctest.Put(t, st, role)
	time.Sleep(100 * time.Millisecond)
	clk.Advance(time.Hour)
	time.Sleep(50 * time.Millisecond)

	if src.calls() != 0 {
		t.Fatalf("a worker scanned %d times", src.calls())
	}
}

type countingSource struct {
	mu sync.Mutex // guards n
	n  int
}

func (c *countingSource) Peers(context.Context) ([]netip.Addr, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.n++

	return nil, nil
}

func (c *countingSource) calls() int {
	c.mu.Lock()
	defer c.mu.Unlock()

	return c.n
}
