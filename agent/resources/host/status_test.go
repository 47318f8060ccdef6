package host_test

import (
	"testing"

	"github.com/sovra-dev/sovra/agent/resources/host"
	"github.com/sovra-dev/sovra/agent/resources/rtest"
)

func TestStatusRoundTrip(t *testing.T) {
	s := host.NewStatus()
	*s.TypedSpec() = host.StatusSpec{
		Phase: host.PhaseApplied, Mode: host.ModeEnrollment, LastAction: "apply", AppliedGeneration: 2,
		Message: "apply the configuration of default/cp-0", LastSync: "2026-11-26T05:00:00Z",
		Architecture: "amd64", CPUs: 4, MemoryBytes: 8 << 30, Disks: 1,
	}
	rtest.RoundTrip(t, s)
}
