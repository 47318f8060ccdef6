package volumes_test

import (
	"testing"

	"github.com/sovra-dev/sovra/agent/resources/rtest"
	"github.com/sovra-dev/sovra/agent/resources/volumes"
)

func TestStatusRoundTrip(t *testing.T) {
	s := volumes.NewStatus("data")
	*s.TypedSpec() = volumes.StatusSpec{
		Phase: volumes.PhaseReady, Device: "/dev/sdb1", Outcome: "formatted",
		MappedPath: "/dev/mapper/sovra-data", LastAttempt: "2026-11-21T13:00:00Z", Message: "ready",
	}
	rtest.RoundTrip(t, s)
}
