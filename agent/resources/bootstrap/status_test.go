package bootstrap_test

import (
	"testing"

	"github.com/sovra-dev/sovra/agent/resources/bootstrap"
	"github.com/sovra-dev/sovra/agent/resources/rtest"
)

func TestStatus(t *testing.T) {
	s := bootstrap.NewStatus()
	*s.TypedSpec() = bootstrap.StatusSpec{Phase: bootstrap.PhaseJoined, Leader: "10.0.0.1", Message: "m"}
	rtest.RoundTrip(t, s)

	if !bootstrap.PhaseJoined.Final() || bootstrap.PhaseFollowing.Final() {
		t.Fatal("Final")
	}
}
