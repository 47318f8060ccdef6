// Package election holds the controller that elects, from two consecutive
// discovery rounds, the one control-plane node that bootstraps etcd.
//
// The rule is the one users know: earliest boot time wins, lowest address
// breaks ties. What makes it split-brain proof is the set of guards around it:
//   - a node only ever bootstraps itself, and only when it is the leader of
//     its own view;
//   - the quorum is the expected control-plane count, so every node that
//     decides has seen every control-plane node, and all views are equal;
//   - a view with more control-plane nodes than expected decides nothing;
//   - the candidate set (addresses and boot times) must be identical over two
//     consecutive rounds;
//   - every boot time, this node's own included, comes from the same source
//     (Talos SystemStat read through the Talos API), and only once Talos on
//     that node reports its clock in sync, since a clock step moves it;
//   - no peer may already have etcd members or data, and a peer whose etcd
//     state is unknown, or a host that answered but could not be read,
//     blocks the decision.
//
// The guarantee holds while at most the expected number of control-plane
// nodes exist before etcd runs on them: a node added beyond that count while
// the others are still joining etcd, and cut off from the leader, could see a
// full-looking view without it. That window is what the daemon's bootstrap
// lease closes; edge-only mode documents it.
package election

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"

	"github.com/sovra-dev/sovra/agent/resources/discovery"
	"github.com/sovra-dev/sovra/agent/resources/election"
)

// requiredStableRounds is the number of consecutive rounds with an identical
// candidate set before a leader is named.
const requiredStableRounds = 2

// Decide computes the election over the current round, given the previous
// one (nil for the first round) and the number of stable rounds before it.
// It is a pure function: the controller and the simulation both call it.
func Decide(prev *discovery.RoundSpec, prevStable int, cur discovery.RoundSpec, expected int) election.ElectionSpec {
	out := election.ElectionSpec{Round: cur.Number, Self: cur.Self, Quorum: expected, Decision: election.DecisionWaiting}

	// Etcd anywhere ends the election for good: the cluster exists.
	for _, p := range cur.Peers {
		if p.HasEtcd() {
			out.Decision = election.DecisionEtcdExists
			out.EtcdPeer = p.Address
			out.Reason = fmt.Sprintf("etcd already exists on %s", p.Address)

			return out
		}
	}

	out.Candidates = Candidates(cur)

	selfSeen := false

	for _, p := range cur.Peers {
		if p.Self && p.ControlPlane {
			selfSeen = true
		}
	}

	for _, p := range cur.Peers {
		if p.ControlPlane && p.EtcdUnknown {
			out.Reason = fmt.Sprintf("the etcd state of %s is unknown", p.Address)

			return out
		}
	}

	for _, p := range cur.Peers {
		if p.ControlPlane && !p.TimeSynced {
			out.Reason = fmt.Sprintf("the clock of %s is not in sync yet: its boot time is not final", p.Address)

			return out
		}
	}

	if cur.Failed > 0 {
		out.Reason = fmt.Sprintf("%d verified hosts could not be read through the Talos API: the view is incomplete", cur.Failed)

		return out
	}

	switch {
	case cur.Self == "" || !selfSeen:
		out.Reason = "this node is not yet visible as a control-plane node through its own Talos API"

		return out
	case len(out.Candidates) < expected:
		out.Reason = fmt.Sprintf("waiting for quorum: %d of %d control-plane nodes seen", len(out.Candidates), expected)

		return out
	case len(out.Candidates) > expected:
		out.Reason = fmt.Sprintf("%d control-plane nodes seen but %d expected: refusing to elect (check the expected count)", len(out.Candidates), expected)

		return out
	}

	out.StableRounds = 1
	if prev != nil && prev.Number == cur.Number-1 && slices.Equal(Candidates(*prev), out.Candidates) {
		out.StableRounds = prevStable + 1
	}

	if out.StableRounds < requiredStableRounds {
		out.Reason = fmt.Sprintf("quorum seen; waiting for the candidate set to be stable (%d of %d rounds)", out.StableRounds, requiredStableRounds)

		return out
	}

	out.Leader = out.Candidates[0].Address
	out.Reason = fmt.Sprintf("%s has the earliest boot time of %d stable control-plane nodes", out.Leader, len(out.Candidates))
	out.Decision = election.DecisionFollower

	if out.Leader == cur.Self {
		out.Decision = election.DecisionLeader
	}

	return out
}

// Candidates returns the control-plane nodes of a round, ordered by boot
// time, then by address: the first one leads.
func Candidates(r discovery.RoundSpec) []election.Candidate {
	var out []election.Candidate

	for _, p := range r.Peers {
		if p.ControlPlane {
			out = append(out, election.Candidate{Address: p.Address, BootTime: p.BootTime})
		}
	}

	slices.SortFunc(out, func(a, b election.Candidate) int {
		if c := cmp.Compare(a.BootTime, b.BootTime); c != 0 {
			return c
		}

		return compareAddr(a.Address, b.Address)
	})

	return out
}

// compareAddr orders addresses numerically (10.0.0.9 before 10.0.0.10);
// strings that are not addresses sort after addresses, by text.
func compareAddr(a, b string) int {
	x, errX := netip.ParseAddr(a)
	y, errY := netip.ParseAddr(b)

	switch {
	case errX == nil && errY == nil:
		return x.Compare(y)
	case errX == nil:
		return -1
	case errY == nil:
		return 1
	}

	return cmp.Compare(a, b)
}
