package attestation

import (
	"crypto/x509"
	"fmt"
	"time"

	"go.uber.org/zap"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/internal/attest"
)

// denialLogEvery is the shortest time between two log lines about one
// node's refusals for one reason.
const denialLogEvery = 10 * time.Second

// pendingDenialEvery is the shortest time between two events about refused
// enrollments on one pending record.
const pendingDenialEvery = time.Minute

// deny logs a refusal of an unauthenticated call (enrollment, or an
// attestation whose evidence the node's AK did not sign): nothing is
// recorded in the API, so no caller can make state by failing (but for the
// bounded event of refuseEnrollment on a machine's pending record). The log
// line is throttled per node and reason.
func (s *Service) deny(node, reason string, err error) {
	if reason == v1alpha1.ReasonEvidenceRejected {
		countVerdict(resultRejected, reason)
	}
	if s.throttle.Allow(node+"/"+reason, s.clock.Now()) {
		s.logger.Warn("denied", zap.String("node", node), zap.String("reason", reason), zap.Error(err))
	}
}

func ekPKIX(ek *attest.EK) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(ek.Public)
	if err != nil {
		return nil, fmt.Errorf("encoding EK public key: %w", err)
	}
	return der, nil
}

func checkNodeName(node string) error {
	if errs := validation.IsDNS1123Subdomain(node); len(errs) > 0 {
		return fmt.Errorf("%w: node name %q: %v", ErrInvalid, node, errs[0])
	}
	return nil
}
