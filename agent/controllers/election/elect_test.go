package election_test

import (
	"strings"
	"testing"

	electionctrl "github.com/sovra-dev/sovra/agent/controllers/election"
	"github.com/sovra-dev/sovra/agent/resources/discovery"
	"github.com/sovra-dev/sovra/agent/resources/election"
)

func cp(addr string, boot int64) discovery.PeerSpec {
	return discovery.PeerSpec{Address: addr, ControlPlane: true, MachineType: "controlplane", BootTime: boot, TimeSynced: true}
}

func round(n int, self string, peers ...discovery.PeerSpec) discovery.RoundSpec {
	for i := range peers {
		peers[i].Self = peers[i].Address == self
	}

	return discovery.RoundSpec{Number: n, Self: self, Peers: peers}
}

// decideTwice runs two identical consecutive rounds and returns the second result.
func decideTwice(self string, expected int, peers ...discovery.PeerSpec) election.ElectionSpec {
	r1 := round(1, self, append([]discovery.PeerSpec(nil), peers...)...)
	first := electionctrl.Decide(nil, 0, r1, expected)
	r2 := round(2, self, append([]discovery.PeerSpec(nil), peers...)...)

	return electionctrl.Decide(&r1, first.StableRounds, r2, expected)
}

func TestEarliestBootWins(t *testing.T) {
	peers := []discovery.PeerSpec{cp("10.0.0.3", 100), cp("10.0.0.2", 90), cp("10.0.0.1", 120)}

	got := decideTwice("10.0.0.2", 3, peers...)
	if got.Decision != election.DecisionLeader || got.Leader != "10.0.0.2" {
		t.Fatalf("self=earliest: %+v", got)
	}

	got = decideTwice("10.0.0.1", 3, peers...)
	if got.Decision != election.DecisionFollower || got.Leader != "10.0.0.2" {
		t.Fatalf("self=later: %+v", got)
	}
}

func TestLowestAddressBreaksTiesNumerically(t *testing.T) {
	got := decideTwice("10.0.0.9", 3, cp("10.0.0.10", 100), cp("10.0.0.9", 100), cp("10.0.0.200", 100))
	if got.Leader != "10.0.0.9" || got.Decision != election.DecisionLeader {
		t.Fatalf("tie: %+v (10.0.0.9 < 10.0.0.10 numerically)", got)
	}
}

func TestFirstRoundNeverElects(t *testing.T) {
	r := round(1, "10.0.0.1", cp("10.0.0.1", 1), cp("10.0.0.2", 2), cp("10.0.0.3", 3))

	got := electionctrl.Decide(nil, 0, r, 3)
	if got.Decision != election.DecisionWaiting || got.StableRounds != 1 {
		t.Fatalf("first round: %+v", got)
	}
}

func TestChangedSetResetsStability(t *testing.T) {
	r1 := round(1, "10.0.0.1", cp("10.0.0.1", 1), cp("10.0.0.2", 2), cp("10.0.0.3", 3))
	first := electionctrl.Decide(nil, 0, r1, 3)
	// Node 3 rebooted: same address, new boot time.
	r2 := round(2, "10.0.0.1", cp("10.0.0.1", 1), cp("10.0.0.2", 2), cp("10.0.0.3", 30))

	got := electionctrl.Decide(&r1, first.StableRounds, r2, 3)
	if got.Decision != election.DecisionWaiting || got.StableRounds != 1 {
		t.Fatalf("changed set: %+v", got)
	}
}

func TestSkippedRoundResetsStability(t *testing.T) {
	r1 := round(1, "10.0.0.1", cp("10.0.0.1", 1), cp("10.0.0.2", 2), cp("10.0.0.3", 3))
	first := electionctrl.Decide(nil, 0, r1, 3)
	r3 := round(3, "10.0.0.1", cp("10.0.0.1", 1), cp("10.0.0.2", 2), cp("10.0.0.3", 3))

	if got := electionctrl.Decide(&r1, first.StableRounds, r3, 3); got.Decision != election.DecisionWaiting {
		t.Fatalf("non-consecutive rounds elected: %+v", got)
	}
}

func TestGuards(t *testing.T) {
	worker := discovery.PeerSpec{Address: "10.0.0.9", MachineType: "worker", BootTime: 0}
	withEtcd := cp("10.0.0.3", 3)
	withEtcd.EtcdData = true
	withMembers := cp("10.0.0.3", 3)
	withMembers.EtcdMembers = 1
	unknown := cp("10.0.0.3", 3)
	unknown.EtcdUnknown = true
	unsynced := cp("10.0.0.3", 3)
	unsynced.TimeSynced = false

	failed := func(peers ...discovery.PeerSpec) election.ElectionSpec {
		r1 := round(1, "10.0.0.1", peers...)
		r1.Failed = 1
		first := electionctrl.Decide(nil, 0, r1, 3)
		r2 := r1
		r2.Number = 2

		return electionctrl.Decide(&r1, first.StableRounds, r2, 3)
	}

	if got := failed(cp("10.0.0.1", 1), cp("10.0.0.2", 2), cp("10.0.0.3", 3)); got.Decision != election.DecisionWaiting || !strings.Contains(got.Reason, "incomplete") {
		t.Fatalf("a host that answered but could not be read did not block: %+v", got)
	}

	for _, c := range []struct {
		name     string
		expected int
		self     string
		peers    []discovery.PeerSpec
		want     election.Decision
		reason   string
	}{
		{"below quorum", 3, "10.0.0.1", []discovery.PeerSpec{cp("10.0.0.1", 1), cp("10.0.0.2", 2)}, election.DecisionWaiting, "waiting for quorum"},
		{"alone with default quorum", 3, "10.0.0.1", []discovery.PeerSpec{cp("10.0.0.1", 1)}, election.DecisionWaiting, "1 of 3"},
		{"alone with expected 1", 1, "10.0.0.1", []discovery.PeerSpec{cp("10.0.0.1", 1)}, election.DecisionLeader, ""},
		{"more than expected", 3, "10.0.0.1", []discovery.PeerSpec{cp("10.0.0.1", 1), cp("10.0.0.2", 2), cp("10.0.0.3", 3), cp("10.0.0.4", 4)}, election.DecisionWaiting, "refusing"},
		{"workers do not count", 3, "10.0.0.1", []discovery.PeerSpec{cp("10.0.0.1", 1), cp("10.0.0.2", 2), worker}, election.DecisionWaiting, "2 of 3"},
		{"etcd data on a peer", 3, "10.0.0.1", []discovery.PeerSpec{cp("10.0.0.1", 1), cp("10.0.0.2", 2), withEtcd}, election.DecisionEtcdExists, "10.0.0.3"},
		{"etcd members on a peer", 3, "10.0.0.1", []discovery.PeerSpec{cp("10.0.0.1", 1), cp("10.0.0.2", 2), withMembers}, election.DecisionEtcdExists, "10.0.0.3"},
		{"etcd state unknown", 3, "10.0.0.1", []discovery.PeerSpec{cp("10.0.0.1", 1), cp("10.0.0.2", 2), unknown}, election.DecisionWaiting, "unknown"},
		{"clock not in sync", 3, "10.0.0.1", []discovery.PeerSpec{cp("10.0.0.1", 1), cp("10.0.0.2", 2), unsynced}, election.DecisionWaiting, "not in sync"},
		{"self not seen", 3, "10.0.0.7", []discovery.PeerSpec{cp("10.0.0.1", 1), cp("10.0.0.2", 2), cp("10.0.0.3", 3)}, election.DecisionWaiting, "not yet visible"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := decideTwice(c.self, c.expected, c.peers...)
			if got.Decision != c.want || !strings.Contains(got.Reason, c.reason) {
				t.Fatalf("got %s (%s), want %s (%q)", got.Decision, got.Reason, c.want, c.reason)
			}
		})
	}
}
