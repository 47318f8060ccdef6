package attestation

import (
	"context"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/internal/attest"
)

// Nonces are stateless: issuing one stores nothing and costs no budget, so
// anonymous GetNonce calls cannot starve a node. A nonce is
//
//	version (1) | expiry, Unix milliseconds (6, big endian) | random (9) | MAC (16)
//
// where MAC = HMAC-SHA256(nonce key, domain | node | the first 16 bytes)
// truncated to 16 bytes. Every replica derives the nonce key from the node CA
// key they share, so any replica checks any replica's nonce. A quote signed
// with the node's pinned AK consumes its nonce by creating an AttestationNonce
// marker named after it; only then does a nonce become state.
const (
	nonceVersion = 1
	nonceExpLen  = 6
	nonceRandLen = 9
	nonceMACLen  = 16
	// nonceBodyLen is what the MAC covers besides the domain and node.
	nonceBodyLen = 1 + nonceExpLen + nonceRandLen
	nonceDomain  = "sovra attestation nonce v1"
	nonceKeyInfo = "sovra attestation nonce key v1"
	nonceKeyLen  = 32
	// nonceSkew tolerates replicas whose clocks differ: a nonce that
	// expires later than now + TTL + nonceSkew was not made by a replica.
	nonceSkew = 5 * time.Second
	// nonceNameLen is the number of hex digits of SHA-256(nonce) in a used
	// nonce's marker name (160 bits).
	nonceNameLen = 40
)

// The nonce layout must fill attest.NonceLen exactly.
var _ = [1]struct{}{}[nonceBodyLen+nonceMACLen-attest.NonceLen]

// NonceName is the AttestationNonce name of a used nonce.
func NonceName(nonce []byte) string {
	sum := sha256.Sum256(nonce)
	return "n-" + hex.EncodeToString(sum[:])[:nonceNameLen]
}

// nonceKey derives the nonce MAC key from the node CA's private key.
func nonceKey(caKey any) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(caKey)
	if err != nil {
		return nil, fmt.Errorf("deriving the nonce key from the node CA key: %w", err)
	}
	return hkdf.Key(sha256.New, der, nil, nonceKeyInfo, nonceKeyLen)
}

func (s *Service) nonceMAC(node string, body []byte) []byte {
	m := hmac.New(sha256.New, s.nonceKey)
	m.Write([]byte(nonceDomain))
	m.Write([]byte{byte(len(node))})
	m.Write([]byte(node))
	m.Write(body)
	return m.Sum(nil)[:nonceMACLen]
}

// IssueNonce makes a 32-byte nonce for node, good once until it expires.
// It stores nothing and reads nothing.
func (s *Service) IssueNonce(_ context.Context, node string) ([]byte, time.Time, error) {
	if err := checkNodeName(node); err != nil {
		return nil, time.Time{}, err
	}
	exp := s.clock.Now().Add(s.cfg.NonceTTL).Truncate(time.Millisecond)
	nonce := make([]byte, attest.NonceLen)
	nonce[0] = nonceVersion
	var ms [8]byte
	binary.BigEndian.PutUint64(ms[:], uint64(exp.UnixMilli()))
	copy(nonce[1:1+nonceExpLen], ms[8-nonceExpLen:])
	if _, err := rand.Read(nonce[1+nonceExpLen : nonceBodyLen]); err != nil {
		return nil, time.Time{}, fmt.Errorf("issuing nonce: %w", err)
	}
	copy(nonce[nonceBodyLen:], s.nonceMAC(node, nonce[:nonceBodyLen]))
	return nonce, exp, nil
}

// checkNonce checks, without state, that nonce was issued by a replica for
// node and has not expired; it returns its expiry.
func (s *Service) checkNonce(node string, nonce []byte) (time.Time, error) {
	if len(nonce) != attest.NonceLen {
		return time.Time{}, fmt.Errorf("%w: nonce of %d bytes, want %d", ErrInvalid, len(nonce), attest.NonceLen)
	}
	if nonce[0] != nonceVersion || !hmac.Equal(nonce[nonceBodyLen:], s.nonceMAC(node, nonce[:nonceBodyLen])) {
		return time.Time{}, fmt.Errorf("%w: not issued by this daemon, or issued to another node", ErrNonce)
	}
	var ms [8]byte
	copy(ms[8-nonceExpLen:], nonce[1:1+nonceExpLen])
	exp := time.UnixMilli(int64(binary.BigEndian.Uint64(ms[:])))
	now := s.clock.Now()
	switch {
	case !now.Before(exp):
		return time.Time{}, fmt.Errorf("%w: expired at %s", ErrNonce, exp.UTC().Format(time.RFC3339))
	case exp.After(now.Add(s.cfg.NonceTTL + nonceSkew)):
		return time.Time{}, fmt.Errorf("%w: expires too late to be this daemon's", ErrNonce)
	}
	return exp, nil
}

// useNonce consumes a checked nonce for node, once across every replica: the
// marker's creation is the atomic step. Call it only once the quote over the
// nonce verified with the node's pinned AK.
func (s *Service) useNonce(ctx context.Context, node string, nonce []byte, exp time.Time) error {
	marker := &v1alpha1.AttestationNonce{
		ObjectMeta: metav1.ObjectMeta{Name: NonceName(nonce), Labels: map[string]string{v1alpha1.LabelNode: node}},
		Spec:       v1alpha1.AttestationNonceSpec{Node: node, ExpiresAt: metav1.NewTime(exp)},
	}
	err := s.store.CreateNonce(ctx, marker)
	switch {
	case errors.Is(err, ErrNonce):
		return fmt.Errorf("%w: already used", ErrNonce)
	case err != nil:
		return fmt.Errorf("recording the use of a nonce of node %s: %w", node, err)
	}
	return nil
}

// SweepNonces removes the markers of nonces that expired: no replica
// accepts them anyway.
func (s *Service) SweepNonces(ctx context.Context) error {
	n, err := s.store.DeleteExpiredNonces(ctx, s.clock.Now())
	if err != nil {
		return fmt.Errorf("sweeping used nonces: %w", err)
	}
	if n > 0 {
		s.logger.Debug("swept used nonces", zap.Int("count", n))
	}
	return nil
}
