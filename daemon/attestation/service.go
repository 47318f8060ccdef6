// Package attestation is the daemon's judge of nodes: it enrolls a node's
// TPM (EK policy, then credential activation, pinning the AK to the EK in the
// node's SovraNode record), issues single-use nonces stored in the API,
// verifies attestations against the pinned AK and the AttestationPolicies
// that select the node, records the verdict in the node's status with an
// event, and issues the short-lived node client certificate.
package attestation

import (
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/sovra-dev/sovra/internal/attest"
)

// Defaults for Config fields left zero.
const (
	DefaultNonceTTL = time.Minute
	DefaultCertTTL  = time.Hour
	// certBackdate tolerates node clocks slightly behind the daemon's.
	certBackdate = time.Minute
)

// Clock tells the time; tests advance it.
type Clock interface{ Now() time.Time }

type systemClock struct{}

func (systemClock) Now() time.Time { return time.Now() }

// Config configures a Service.
type Config struct {
	// EK decides which endorsement keys may enroll.
	EK attest.EKPolicy
	// NonceTTL is how long a nonce is accepted; zero means DefaultNonceTTL.
	NonceTTL time.Duration
	// CertTTL is the lifetime of node client certificates; zero means
	// DefaultCertTTL.
	CertTTL time.Duration
	// NodeCA signs node client certificates; NodeCAKey is its key.
	NodeCA    *x509.Certificate
	NodeCAKey crypto.Signer
}

// Validate reports every problem of c at once.
func (c Config) Validate() error {
	var errs []error
	if c.NonceTTL < 0 {
		errs = append(errs, errors.New("nonce TTL is negative"))
	}
	if c.CertTTL < 0 {
		errs = append(errs, errors.New("certificate TTL is negative"))
	}
	if c.NodeCA == nil || c.NodeCAKey == nil {
		errs = append(errs, errors.New("node CA certificate and key are required to issue node credentials"))
	} else if !c.NodeCA.IsCA {
		errs = append(errs, errors.New("node CA certificate is not a CA"))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("invalid attestation config: %w", err)
	}
	return nil
}

// Service enrolls and attests nodes. It is safe for concurrent use; all its
// state is in the Store, except the throttle of refusal events.
type Service struct {
	cfg      Config
	store    Store
	clock    Clock
	logger   *zap.Logger
	throttle eventThrottle
}

// New returns a Service over store. A nil clock is the system clock and a
// nil logger discards.
func New(cfg Config, store Store, clock Clock, logger *zap.Logger) (*Service, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.NonceTTL == 0 {
		cfg.NonceTTL = DefaultNonceTTL
	}
	if cfg.CertTTL == 0 {
		cfg.CertTTL = DefaultCertTTL
	}
	if clock == nil {
		clock = systemClock{}
	}
	if logger == nil {
		logger = zap.NewNop()
	}
	if cfg.EK.TrustOnFirstUse {
		logger.Warn("EK trust on first use is ON: any TPM that presents no verifiable certificate can enroll; use it in labs only")
	}
	return &Service{cfg: cfg, store: store, clock: clock, logger: logger}, nil
}

// NodeName is the SovraNode name of an EK hash: "ek-" and its first 32 hex
// digits. The full hash is in the record and checked on every use.
func NodeName(ekHash string) string {
	const prefixLen = 32
	if len(ekHash) > prefixLen {
		ekHash = ekHash[:prefixLen]
	}
	return "ek-" + ekHash
}
