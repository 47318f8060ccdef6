package election_test

import (
	"testing"

	"github.com/sovra-dev/sovra/agent/resources/election"
	"github.com/sovra-dev/sovra/agent/resources/rtest"
)

func TestElection(t *testing.T) {
	e := election.NewElection()
	*e.TypedSpec() = election.ElectionSpec{
		Round: 3, Self: "10.0.0.2", Quorum: 3, StableRounds: 2, Decision: election.DecisionFollower, Leader: "10.0.0.1",
		Reason: "r", Candidates: []election.Candidate{{Address: "10.0.0.1", BootTime: 1}, {Address: "10.0.0.2", BootTime: 2}},
	}
	rtest.RoundTrip(t, e)
}
