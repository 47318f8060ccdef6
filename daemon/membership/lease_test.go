package membership

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
)

func cluster(n int) []*v1alpha1.SovraNode {
	out := make([]*v1alpha1.SovraNode, 0, n)
	for i := range n {
		out = append(out, node(fmt.Sprintf("ek-%02d", i), "prod", fmt.Sprintf("10.0.0.%d", i+1), v1alpha1.ResultPassed))
	}
	return out
}

func addr(i int) string { return fmt.Sprintf("10.0.0.%d", i+1) }

func TestLeaseRaceHasExactlyOneWinner(t *testing.T) {
	const racers = 32
	for round := range 20 {
		h := newHarness(t, cluster(racers)...)
		var (
			wg      sync.WaitGroup
			mu      sync.Mutex // guards winners
			winners []string
		)
		start := make(chan struct{})
		for i := range racers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				name := fmt.Sprintf("ek-%02d", i)
				d, err := h.svc.BootstrapLease(context.Background(), id(name), PhaseHeld, addr(i))
				if err != nil {
					t.Errorf("%s: %v", name, err)
					return
				}
				if d.Granted {
					mu.Lock()
					winners = append(winners, name)
					mu.Unlock()
				}
			}()
		}
		close(start)
		wg.Wait()
		if len(winners) != 1 {
			t.Fatalf("round %d: winners = %v, want exactly one", round, winners)
		}
		st, ok, err := h.svc.Holder(context.Background(), "prod")
		if err != nil || !ok || st.Holder != winners[0] || st.Phase != PhaseHeld {
			t.Fatalf("lease = %+v %v %v, want held by %s", st, ok, err, winners[0])
		}
	}
}

func TestLeaseCommitRaceAgainstTakeover(t *testing.T) {
	// The holder's lease expired: the holder's commit and a takeover race.
	// Exactly one of them may succeed, whatever the interleaving.
	for round := range 50 {
		h := newHarness(t, cluster(2)...)
		ctx := context.Background()
		if d, err := h.svc.BootstrapLease(ctx, id("ek-00"), PhaseHeld, addr(0)); err != nil || !d.Granted {
			t.Fatalf("first acquire: %+v %v", d, err)
		}
		h.clock.Advance(2 * time.Minute)
		var commit, takeover Decision
		var wg sync.WaitGroup
		wg.Add(2)
		go func() {
			defer wg.Done()
			commit, _ = h.svc.BootstrapLease(ctx, id("ek-00"), PhaseBootstrapping, addr(0))
		}()
		go func() { defer wg.Done(); takeover, _ = h.svc.BootstrapLease(ctx, id("ek-01"), PhaseHeld, addr(1)) }()
		wg.Wait()
		if commit.Granted == takeover.Granted {
			t.Fatalf("round %d: commit %v and takeover %v: want exactly one", round, commit.Granted, takeover.Granted)
		}
		// Whoever lost can no longer bootstrap.
		loser, loserAddr := "ek-01", addr(1)
		if takeover.Granted {
			loser, loserAddr = "ek-00", addr(0)
		}
		if d, _ := h.svc.BootstrapLease(ctx, id(loser), PhaseBootstrapping, loserAddr); d.Granted {
			t.Fatalf("round %d: loser %s committed: %+v", round, loser, d)
		}
	}
}

func TestLeaseLifecycle(t *testing.T) {
	h := newHarness(t, cluster(3)...)
	ctx := context.Background()
	ask := func(i int, p Phase) Decision {
		t.Helper()
		d, err := h.svc.BootstrapLease(ctx, id(fmt.Sprintf("ek-%02d", i)), p, addr(i))
		if err != nil {
			t.Fatal(err)
		}
		return d
	}

	if d := ask(0, PhaseBootstrapping); d.Granted {
		t.Fatal("commit without a lease granted")
	}
	if d := ask(0, PhaseHeld); !d.Granted || d.Reason != ReasonLeaseWon || d.Cluster != "prod" {
		t.Fatalf("first acquire = %+v", d)
	}
	if d := ask(1, PhaseHeld); d.Granted || !strings.Contains(d.Message, "ek-00 (10.0.0.1) holds") {
		t.Fatalf("second node = %+v, want denied naming the holder", d)
	}
	h.clock.Advance(50 * time.Second)
	if d := ask(0, PhaseHeld); !d.Granted || d.Reason != ReasonLeaseRenewed {
		t.Fatalf("renewal = %+v", d)
	}
	h.clock.Advance(50 * time.Second) // renewed 50 s ago: still held
	if d := ask(1, PhaseHeld); d.Granted {
		t.Fatalf("taken over a renewed lease: %+v", d)
	}
	h.clock.Advance(20 * time.Second) // expired
	if d := ask(1, PhaseHeld); !d.Granted || d.Lease.Transitions != 1 || !strings.Contains(d.Message, "expire") {
		t.Fatalf("takeover of an expired lease = %+v", d)
	}
	if d := ask(0, PhaseBootstrapping); d.Granted {
		t.Fatalf("former holder committed: %+v", d)
	}
	if d := ask(1, PhaseBootstrapping); !d.Granted || d.Lease.Phase != PhaseBootstrapping || d.Reason != ReasonBootstrapStarted {
		t.Fatalf("commit = %+v", d)
	}
	h.clock.Advance(time.Hour) // a committed lease never expires
	if d := ask(2, PhaseHeld); d.Granted || !strings.Contains(d.Message, "is bootstrapping") {
		t.Fatalf("takeover of a committed lease = %+v", d)
	}
	if d := ask(1, PhaseHeld); !d.Granted || d.Lease.Phase != PhaseBootstrapping {
		t.Fatalf("holder asking again after a restart = %+v, want granted, still Bootstrapping", d)
	}
	if d := ask(1, PhaseBootstrapped); !d.Granted || d.Reason != ReasonBootstrapFinished {
		t.Fatalf("done = %+v", d)
	}
	if d := ask(0, PhaseHeld); d.Granted || !strings.Contains(d.Message, "bootstrapped the cluster") {
		t.Fatalf("after done = %+v", d)
	}

	var l coordinationv1.Lease
	if err := h.client.Get(ctx, client.ObjectKey{Namespace: DefaultNamespace, Name: "bootstrap-prod"}, &l); err != nil {
		t.Fatal(err)
	}
	if *l.Spec.HolderIdentity != "ek-01" || l.Annotations[AnnotationPhase] != string(PhaseBootstrapped) || l.Annotations[AnnotationHolderAddress] != "10.0.0.2" || l.Labels[LabelCluster] != "prod" {
		t.Fatalf("lease object = %+v", l)
	}

	ev := strings.Join(h.events.list(), "\n")
	for _, want := range []string{"ek-00 Normal BootstrapLeaseWon", "ek-01 Warning BootstrapLeaseDenied", "ek-01 Normal BootstrapStarted", "ek-01 Normal Bootstrapped", "ek-00 Warning BootstrapLeaseDenied: ek-01 (10.0.0.2) bootstrapped the cluster"} {
		if !strings.Contains(ev, want) {
			t.Errorf("events lack %q:\n%s", want, ev)
		}
	}
}

func TestLeaseRefusals(t *testing.T) {
	h := newHarness(t, append(cluster(1),
		node("ek-f", "prod", "10.0.0.9", v1alpha1.ResultFailed),
		node("ek-o", "other", "10.0.1.1", v1alpha1.ResultPassed))...)
	ctx := context.Background()
	cases := []struct {
		id    string
		phase Phase
		addr  string
		want  error
	}{
		{"ek-00", "", addr(0), ErrInvalid},
		{"ek-00", "Whatever", addr(0), ErrInvalid},
		{"ek-00", PhaseHeld, "", ErrInvalid},
		{"ek-00", PhaseHeld, "10.0.0.77", ErrInvalid},
		{"ek-f", PhaseHeld, "10.0.0.9", ErrNotAttested},
		{"ek-gone", PhaseHeld, "10.0.0.1", ErrNotEnrolled},
	}
	for _, c := range cases {
		if _, err := h.svc.BootstrapLease(ctx, id(c.id), c.phase, c.addr); !errors.Is(err, c.want) {
			t.Errorf("%s %q %q: err = %v, want %v", c.id, c.phase, c.addr, err, c.want)
		}
	}
	// Clusters have separate leases.
	for _, who := range []struct{ id, addr string }{{"ek-00", addr(0)}, {"ek-o", "10.0.1.1"}} {
		if d, err := h.svc.BootstrapLease(ctx, id(who.id), PhaseHeld, who.addr); err != nil || !d.Granted {
			t.Fatalf("%s: %+v %v", who.id, d, err)
		}
	}
}

func TestDecideNeverHandsOverACommittedLease(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	for _, phase := range []Phase{PhaseBootstrapping, PhaseBootstrapped, phaseMissing, "Garbage"} {
		for _, want := range []Phase{PhaseHeld, PhaseBootstrapping, PhaseBootstrapped} {
			cur := &LeaseState{Holder: "a", Phase: phase, Renewed: now.Add(-24 * time.Hour), Duration: time.Second}
			next, d := decide(cur, "b", "10.0.0.2", want, now, time.Minute)
			if next != nil || d.Granted {
				t.Errorf("%s lease, b asks %s: granted %v, write %+v", phase, want, d.Granted, next)
			}
		}
	}
}

// TestProviderAndAgentsShareOneLease: the Talos control-plane provider's
// CommitFor and the agents' BootstrapLease contend for the same lease; once
// one side committed, the other is denied.
func TestProviderAndAgentsShareOneLease(t *testing.T) {
	ctx := context.Background()
	const provider = "taloscontrolplane/default/cp"

	h := newHarness(t, cluster(3)...)
	if d, err := h.svc.BootstrapLease(ctx, id("ek-01"), PhaseHeld, addr(1)); err != nil || !d.Granted {
		t.Fatalf("agent Held: %+v %v", d, err)
	}
	if d, err := h.svc.CommitFor(ctx, "prod", provider, "10.0.0.1"); err != nil || d.Granted {
		t.Fatalf("provider CommitFor over an agent's hold = %+v %v, want denied", d, err)
	}
	h.clock.Advance(time.Minute) // the agent never committed
	d, err := h.svc.CommitFor(ctx, "prod", provider, "10.0.0.1")
	if err != nil || !d.Granted || d.Lease.Phase != PhaseBootstrapping || d.Lease.Holder != provider || d.Lease.HolderAddress != "10.0.0.1" {
		t.Fatalf("provider CommitFor after expiry = %+v %v, want committed to 10.0.0.1", d, err)
	}
	h.clock.Advance(time.Hour)
	for i := range 3 {
		if d, err := h.svc.BootstrapLease(ctx, id(fmt.Sprintf("ek-%02d", i)), PhaseHeld, addr(i)); err != nil || d.Granted {
			t.Fatalf("agent %d after the provider committed = %+v %v, want denied", i, d, err)
		}
	}
	if d, err := h.svc.FinishFor(ctx, "prod", "taloscontrolplane/other/cp", ""); err != nil || d.Granted {
		t.Fatalf("FinishFor by another holder = %+v %v, want denied", d, err)
	}
	if d, err := h.svc.FinishFor(ctx, "prod", provider, "10.0.0.1"); err != nil || !d.Granted || d.Lease.Phase != PhaseBootstrapped {
		t.Fatalf("FinishFor = %+v %v, want Bootstrapped", d, err)
	}

	h = newHarness(t, cluster(3)...)
	if d, err := h.svc.CommitFor(ctx, "prod", provider, "10.0.0.1"); err != nil || !d.Granted {
		t.Fatalf("provider first: %+v %v", d, err)
	}
	if d, err := h.svc.BootstrapLease(ctx, id("ek-00"), PhaseHeld, addr(0)); err != nil || d.Granted {
		t.Fatalf("agent after the provider = %+v %v, want denied", d, err)
	}
	if _, err := h.svc.CommitFor(ctx, "Not_A_Label", provider, ""); !errors.Is(err, ErrInvalid) {
		t.Fatalf("CommitFor with a bad cluster name: %v, want ErrInvalid", err)
	}
	if n, err := h.svc.Enrolled(ctx, "prod"); err != nil || n != 3 {
		t.Fatalf("Enrolled = %d %v, want 3", n, err)
	}

	// The cluster is deleted: its lease goes, for the holder only.
	if ok, err := h.svc.Forget(ctx, "prod", "ek-00"); err != nil || ok {
		t.Fatalf("Forget by a non-holder = %v %v, want kept", ok, err)
	}
	if ok, err := h.svc.Forget(ctx, "prod", provider); err != nil || !ok {
		t.Fatalf("Forget by the holder = %v %v, want deleted", ok, err)
	}
	if _, found, err := h.svc.Holder(ctx, "prod"); err != nil || found {
		t.Fatalf("lease after Forget: found=%v %v", found, err)
	}
	if ok, err := h.svc.Forget(ctx, "prod", provider); err != nil || ok {
		t.Fatalf("Forget of no lease = %v %v", ok, err)
	}
	if d, err := h.svc.BootstrapLease(ctx, id("ek-00"), PhaseHeld, addr(0)); err != nil || !d.Granted {
		t.Fatalf("agent of the cluster created again = %+v %v, want granted", d, err)
	}
}
