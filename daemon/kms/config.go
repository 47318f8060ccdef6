package kms

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"golang.org/x/time/rate"
)

// Defaults for Config fields left zero.
const (
	// DefaultAttestDeadline is how long a key release waits for a boot
	// report that explains it before it is judged unexpected (and, in lab
	// mode, how long a lab record has to enroll).
	DefaultAttestDeadline = 10 * time.Minute
	// DefaultSealWindow is how long after its creation a record may Seal.
	DefaultSealWindow = time.Hour
	// DefaultSourceRate and DefaultSourceBurst bound one source address's
	// calls: a boot needs two (STATE and EPHEMERAL), a few more with user
	// volumes, plus Talos's retries. Behind a NAT or a proxy, raise them.
	DefaultSourceRate  = rate.Limit(5)
	DefaultSourceBurst = 20
	// DefaultGlobalRate and DefaultGlobalBurst bound all calls together, so
	// a flood of made-up UUIDs cannot starve real boots of CPU or the
	// datastore of writes; sources that called little keep a reserve.
	DefaultGlobalRate  = rate.Limit(5000)
	DefaultGlobalBurst = 5000
)

// How releases are attributed to boots (see accounting.go).
const (
	// BootUnsealWindow is how long after a boot's start Talos unseals its
	// volumes: a release later than that is no boot's.
	BootUnsealWindow = 30 * time.Minute
	// RetryWindow is how long after a release the same caller's release of
	// the same blob counts as a retry of it.
	RetryWindow = 2 * time.Minute
	// BootSkew tolerates node clocks behind the daemon's.
	BootSkew = 2 * time.Minute
	// FreshSealWindow is how long after a Seal the first release of the
	// blob is explained by the Seal itself (Talos opens what it formatted).
	FreshSealWindow = 10 * time.Minute
	// UnattestedBootWindow is how long before a reported boot's start a
	// release from one of the node's own addresses is taken for a boot that
	// ended before its agent attested (a staged upgrade's install boot, a
	// crash early in a boot).
	UnattestedBootWindow = 15 * time.Minute
	// MaxSealingWindow bounds a window an operator opens.
	MaxSealingWindow = 24 * time.Hour
)

// Config configures the KMS. The zero value is production mode with the
// defaults above and no address binding.
type Config struct {
	// LabMode lets any node UUID Seal: its record is created on the first
	// Seal and must enroll within AttestDeadline. Off means only records
	// inside a sealing window may Seal.
	LabMode bool
	// AttestDeadline is how long a key release waits for a boot report
	// that explains it before it is judged unexpected; zero means
	// DefaultAttestDeadline.
	AttestDeadline time.Duration
	// SealWindow is how long after its creation a record may Seal (the
	// first install of a pre-registered or newly enrolled node); zero means
	// DefaultSealWindow.
	SealWindow time.Duration
	// QuarantineUnexpected quarantines a node whose key was released
	// unexpectedly (a strict site's choice); off, an unexpected release is
	// an alarm (condition and event) and the node still boots.
	QuarantineUnexpected bool
	// BindAddresses refuses calls whose source is not one of the node's
	// known addresses.
	BindAddresses bool
	// TrustedProxies are the networks whose X-Forwarded-For header is
	// believed; from any other peer the header is ignored.
	TrustedProxies []netip.Prefix
	// Replica names this replica in its ledger of key releases; it must
	// differ between replicas and stay the same across restarts. Empty
	// means "default" (one replica).
	Replica string
	// SourceRate/SourceBurst and GlobalRate/GlobalBurst are the rate
	// limits; zero means the defaults.
	SourceRate  rate.Limit
	SourceBurst int
	GlobalRate  rate.Limit
	GlobalBurst int
}

// Validate reports every problem of c at once.
func (c Config) Validate() error {
	var errs []error
	if c.AttestDeadline < 0 {
		errs = append(errs, errors.New("attest deadline is negative"))
	}
	if c.SealWindow < 0 {
		errs = append(errs, errors.New("seal window is negative"))
	}
	if c.SourceRate < 0 || c.GlobalRate < 0 || c.SourceBurst < 0 || c.GlobalBurst < 0 {
		errs = append(errs, errors.New("rate limits must not be negative"))
	}
	for _, p := range c.TrustedProxies {
		if !p.IsValid() {
			errs = append(errs, fmt.Errorf("trusted proxy network %v is not valid", p))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("invalid KMS config: %w", err)
	}
	return nil
}

func (c Config) withDefaults() Config {
	if c.AttestDeadline == 0 {
		c.AttestDeadline = DefaultAttestDeadline
	}
	if c.SealWindow == 0 {
		c.SealWindow = DefaultSealWindow
	}
	if c.SourceRate == 0 {
		c.SourceRate = DefaultSourceRate
	}
	if c.SourceBurst == 0 {
		c.SourceBurst = DefaultSourceBurst
	}
	if c.GlobalRate == 0 {
		c.GlobalRate = DefaultGlobalRate
	}
	if c.GlobalBurst == 0 {
		c.GlobalBurst = DefaultGlobalBurst
	}
	if c.Replica == "" {
		c.Replica = "default"
	}
	return c
}

// policyVersion names the rules a decision was made under, for the audit.
func (c Config) policyVersion() string {
	return fmt.Sprintf("kms/v2 lab=%t bind=%t deadline=%s quarantine-unexpected=%t", c.LabMode, c.BindAddresses, c.AttestDeadline, c.QuarantineUnexpected)
}

// ReplicaName derives a replica's ledger name from its identity (its
// advertised URL): a DNS label that stays the same across restarts.
func ReplicaName(identity string) string {
	sum := sha256.Sum256([]byte(identity))
	return "r" + hex.EncodeToString(sum[:])[:12]
}

// ParseTrustedProxies parses CIDRs or single addresses.
func ParseTrustedProxies(list []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	var errs []error
	for _, s := range list {
		if p, err := netip.ParsePrefix(s); err == nil {
			out = append(out, p.Masked())
			continue
		}
		if a, err := netip.ParseAddr(s); err == nil {
			out = append(out, netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()))
			continue
		}
		errs = append(errs, fmt.Errorf("%q is neither a CIDR nor an IP address", s))
	}
	return out, errors.Join(errs...)
}
