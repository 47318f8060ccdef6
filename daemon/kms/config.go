package kms

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"golang.org/x/time/rate"
)

// Defaults for Config fields left zero.
const (
	// DefaultAttestDeadline is how long a node has, after an Unseal, to
	// pass an attestation before it is quarantined.
	DefaultAttestDeadline = 10 * time.Minute
	// DefaultNodeRate and DefaultNodeBurst bound one node UUID's calls: a
	// boot needs two (STATE and EPHEMERAL), a few more with user volumes,
	// plus Talos's retries.
	DefaultNodeRate  = rate.Limit(5)
	DefaultNodeBurst = 20
	// DefaultGlobalRate and DefaultGlobalBurst bound all calls together, so
	// a flood of made-up UUIDs cannot starve real boots of CPU or the
	// datastore of writes.
	DefaultGlobalRate  = rate.Limit(5000)
	DefaultGlobalBurst = 5000
)

// Config configures the KMS. The zero value is production mode with the
// defaults above and no address binding.
type Config struct {
	// LabMode lets any node UUID Seal: its record is created on the first
	// Seal and must enroll within AttestDeadline. Off means only enrolled or
	// pre-registered nodes may Seal.
	LabMode bool
	// AttestDeadline is how long a node has, after an Unseal (or, in lab
	// mode, after its record was created), to pass an attestation (or to
	// enroll); zero means DefaultAttestDeadline.
	AttestDeadline time.Duration
	// BindAddresses refuses calls whose source is not one of the node's
	// known addresses.
	BindAddresses bool
	// TrustedProxies are the networks whose X-Forwarded-For header is
	// believed; from any other peer the header is ignored.
	TrustedProxies []netip.Prefix
	// InstallCRDs makes Run install the sovra.dev CRDs; false waits for
	// whoever installs them (the node API, when it runs in the daemon).
	InstallCRDs bool
	// NodeRate/NodeBurst and GlobalRate/GlobalBurst are the rate limits;
	// zero means the defaults.
	NodeRate    rate.Limit
	NodeBurst   int
	GlobalRate  rate.Limit
	GlobalBurst int
}

// Validate reports every problem of c at once.
func (c Config) Validate() error {
	var errs []error
	if c.AttestDeadline < 0 {
		errs = append(errs, errors.New("attest deadline is negative"))
	}
	if c.NodeRate < 0 || c.GlobalRate < 0 || c.NodeBurst < 0 || c.GlobalBurst < 0 {
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
	if c.NodeRate == 0 {
		c.NodeRate = DefaultNodeRate
	}
	if c.NodeBurst == 0 {
		c.NodeBurst = DefaultNodeBurst
	}
	if c.GlobalRate == 0 {
		c.GlobalRate = DefaultGlobalRate
	}
	if c.GlobalBurst == 0 {
		c.GlobalBurst = DefaultGlobalBurst
	}
	return c
}

// policyVersion names the rules a decision was made under, for the audit.
func (c Config) policyVersion() string {
	return fmt.Sprintf("kms/v1 lab=%t bind=%t deadline=%s", c.LabMode, c.BindAddresses, c.AttestDeadline)
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
