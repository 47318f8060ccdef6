package attestation_test

import (
	"testing"

	"github.com/sovra-dev/sovra/agent/resources/attestation"
	"github.com/sovra-dev/sovra/agent/resources/rtest"
)

func TestStatusRoundTrip(t *testing.T) {
	s := attestation.NewStatus()
	*s.TypedSpec() = attestation.StatusSpec{
		Phase: attestation.PhaseAttested, Node: "ek-0123", LastAttempt: "2026-11-21T13:00:00Z",
		LastSuccess: "2026-11-21T13:00:00Z", CredentialExpires: "2026-11-21T14:00:00Z",
		Message: "attested", Warnings: []string{"policy x: warn"},
	}
	rtest.RoundTrip(t, s)
}
