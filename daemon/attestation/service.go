// Package attestation is the daemon's judge of nodes: it enrolls a node's
// TPM (EK policy, then credential activation, pinning the AK to the EK in the
// node's SovraNode record and binding its SMBIOS UUID with a UUIDClaim),
// issues stateless single-use nonces, verifies attestations against the
// pinned AK and the AttestationPolicies that select the node (failing closed
// on a policy it cannot evaluate), records the verdict and the boot the node
// reported in its status with an event, and only then issues the
// short-lived node credential (package nodeauth) for that record and boot.
//
// Nothing a caller does before it proves possession of the node's AK
// changes state: a refused enrollment or an unauthenticated attestation is
// logged, not recorded.
package attestation

import (
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"
	"golang.org/x/time/rate"

	"github.com/sovra-dev/sovra/daemon/ratelimit"
	"github.com/sovra-dev/sovra/internal/attest"
)

// Defaults for Config fields left zero.
const (
	DefaultNonceTTL = time.Minute
	DefaultCertTTL  = time.Hour
	// DefaultSealWindow is the default of Config.SealWindow.
	DefaultSealWindow = time.Hour
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
	// NodeCA signs node client certificates; NodeCAKey is its key. Every
	// replica holds the same pair, and derives the nonce key from it.
	NodeCA    *x509.Certificate
	NodeCAKey crypto.Signer
	// SealWindow is how long a node that enrolled and never sealed may
	// Seal afterwards (its first install); zero means DefaultSealWindow.
	SealWindow time.Duration
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
	if c.SealWindow < 0 {
		errs = append(errs, errors.New("seal window is negative"))
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
// state is in the Store, except the throttles of refusal log lines and events.
type Service struct {
	cfg      Config
	store    Store
	clock    Clock
	logger   *zap.Logger
	throttle *ratelimit.Keyed
	// pendingDenials paces the events of refused enrollments per UUID.
	pendingDenials *ratelimit.Keyed
	// nonceKey MACs nonces; derived from the node CA key.
	nonceKey []byte
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
	if cfg.SealWindow == 0 {
		cfg.SealWindow = DefaultSealWindow
	}
	key, err := nonceKey(cfg.NodeCAKey)
	if err != nil {
		return nil, err
	}
	if clock == nil {
		clock = systemClock{}
	}
	if logger == nil {
		logger = zap.NewNop()
	}
	zeroMetrics()
	if cfg.EK.TrustOnFirstUse {
		logger.Warn("EK trust on first use is ON: any TPM that presents no verifiable certificate can enroll; use it in labs only")
	}
	return &Service{cfg: cfg, store: store, clock: clock, logger: logger, nonceKey: key,
		throttle:       ratelimit.New(rate.Every(denialLogEvery), 1, 0, 0),
		pendingDenials: ratelimit.New(rate.Every(pendingDenialEvery), 1, 0, 0)}, nil
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
