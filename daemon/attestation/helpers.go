package attestation

import (
	"context"
	"crypto/x509"
	"fmt"

	"go.uber.org/zap"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/internal/attest"
)

// deny logs and records a refusal about a node that may not exist yet.
func (s *Service) deny(ctx context.Context, node, reason string, err error) {
	s.logger.Warn("denied", zap.String("node", node), zap.String("reason", reason), zap.Error(err))
	ref := &v1alpha1.SovraNode{ObjectMeta: metav1.ObjectMeta{Name: node}}
	if existing, gerr := s.store.GetNode(ctx, node); gerr == nil {
		ref = existing
	}
	s.store.Event(ctx, ref, true, reason, err.Error())
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
