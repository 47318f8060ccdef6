package attestation

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/internal/attest"
)

// maxOutstandingNonces bounds the unused nonces of one node, so that
// unauthenticated nonce requests cannot fill the API.
const maxOutstandingNonces = 8

// nonceNameLen is the number of hex digits of SHA-256(nonce) in a nonce's
// object name (160 bits): the nonce itself is never stored.
const nonceNameLen = 40

// NonceName is the AttestationNonce name of a nonce.
func NonceName(nonce []byte) string {
	sum := sha256.Sum256(nonce)
	return "n-" + hex.EncodeToString(sum[:])[:nonceNameLen]
}

// IssueNonce makes a 32-byte nonce for node, valid once until it expires.
func (s *Service) IssueNonce(ctx context.Context, node string) ([]byte, time.Time, error) {
	if err := checkNodeName(node); err != nil {
		return nil, time.Time{}, err
	}
	if _, err := s.store.GetNode(ctx, node); err != nil {
		return nil, time.Time{}, fmt.Errorf("issuing nonce for node %s: %w", node, err)
	}
	n, err := s.store.CountNonces(ctx, node)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("issuing nonce for node %s: %w", node, err)
	}
	if n >= maxOutstandingNonces {
		if err := s.SweepNonces(ctx); err != nil {
			return nil, time.Time{}, err
		}
		if n, err = s.store.CountNonces(ctx, node); err != nil {
			return nil, time.Time{}, fmt.Errorf("issuing nonce for node %s: %w", node, err)
		}
		if n >= maxOutstandingNonces {
			return nil, time.Time{}, fmt.Errorf("%w: node %s has %d unused nonces; use one or wait %s for them to expire",
				ErrBusy, node, n, s.cfg.NonceTTL)
		}
	}
	nonce := make([]byte, attest.NonceLen)
	if _, err := rand.Read(nonce); err != nil {
		return nil, time.Time{}, fmt.Errorf("issuing nonce: %w", err)
	}
	exp := s.clock.Now().Add(s.cfg.NonceTTL)
	obj := &v1alpha1.AttestationNonce{
		ObjectMeta: metav1.ObjectMeta{Name: NonceName(nonce), Labels: map[string]string{v1alpha1.LabelNode: node}},
		Spec:       v1alpha1.AttestationNonceSpec{Node: node, ExpiresAt: metav1.NewTime(exp)},
	}
	if err := s.store.CreateNonce(ctx, obj); err != nil {
		return nil, time.Time{}, fmt.Errorf("storing nonce for node %s: %w", node, err)
	}
	return nonce, exp, nil
}

// consumeNonce accepts nonce for node at most once: it must exist, belong to
// node and not have expired. A nonce of another node is left for its owner;
// an expired one is removed.
func (s *Service) consumeNonce(ctx context.Context, node string, nonce []byte) error {
	if len(nonce) != attest.NonceLen {
		return fmt.Errorf("%w: nonce of %d bytes, want %d", ErrInvalid, len(nonce), attest.NonceLen)
	}
	n, err := s.store.GetNonce(ctx, NonceName(nonce))
	if err != nil {
		return fmt.Errorf("%w: unknown or already used", err)
	}
	if n.Spec.Node != node {
		return fmt.Errorf("%w: issued to another node", ErrNonce)
	}
	if !s.clock.Now().Before(n.Spec.ExpiresAt.Time) {
		if err := s.store.DeleteNonce(ctx, n); err != nil && !errors.Is(err, ErrNonce) {
			s.logger.Warn("removing expired nonce", zap.Error(err))
		}
		return fmt.Errorf("%w: expired at %s", ErrNonce, n.Spec.ExpiresAt.UTC().Format(time.RFC3339))
	}
	if err := s.store.DeleteNonce(ctx, n); err != nil {
		return fmt.Errorf("%w: already used", err)
	}
	return nil
}

// SweepNonces removes expired nonces that were never used.
func (s *Service) SweepNonces(ctx context.Context) error {
	n, err := s.store.DeleteExpiredNonces(ctx, s.clock.Now())
	if err != nil {
		return fmt.Errorf("sweeping expired nonces: %w", err)
	}
	if n > 0 {
		s.logger.Debug("swept expired nonces", zap.Int("count", n))
	}
	return nil
}
