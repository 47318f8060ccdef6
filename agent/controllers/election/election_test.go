package election_test

import (
	"testing"

	"github.com/sovra-dev/sovra/agent/controllers/ctest"
	electionctrl "github.com/sovra-dev/sovra/agent/controllers/election"
	"github.com/sovra-dev/sovra/agent/resources/discovery"
	"github.com/sovra-dev/sovra/agent/resources/election"
)

func TestControllerElectsAfterTwoStableRounds(t *testing.T) {
	st := ctest.Start(t, &electionctrl.ElectionController{ExpectedControlPlanes: 3})
	ptr := election.NewElection().Metadata()

	put := func(n int) {
		r := discovery.NewRound()
		*r.TypedSpec() = round(n, "10.0.0.2", cp("10.0.0.1", 50), cp("10.0.0.2", 10), cp("10.0.0.3", 30))
		ctest.Put(t, st, r)
	}

	put(1)
	ctest.WaitFor(t, st, ptr, func(e *election.Election) bool {
		return e.TypedSpec().Round == 1 && e.TypedSpec().Decision == election.DecisionWaiting
	})

	put(2)

	got := ctest.WaitFor(t, st, ptr, func(e *election.Election) bool { return e.TypedSpec().Round == 2 })
	if got.TypedSpec().Decision != election.DecisionLeader || got.TypedSpec().Leader != "10.0.0.2" {
		t.Fatalf("round 2: %+v", got.TypedSpec())
	}
}
