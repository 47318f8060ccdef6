package attestation

import (
	"bufio"
	"bytes"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strings"

	"github.com/sovra-dev/sovra/internal/attest"
)

// ekHashPattern is a hex SHA-256 as in SovraNode.spec.ekHash.
var ekHashPattern = regexp.MustCompile(`^[0-9a-f]{64}$`)

// EKPolicyFiles names the files an operator configures the EK policy with;
// sovrad maps its flags onto it. Empty fields are unused.
type EKPolicyFiles struct {
	// Roots is a PEM bundle of TPM manufacturer root CAs.
	Roots string
	// Intermediates is a PEM bundle of manufacturer intermediate CAs.
	Intermediates string
	// AllowList has one hex EK hash per line; '#' starts a comment.
	AllowList string
	// TrustOnFirstUse admits EKs with nothing to check. Labs only.
	TrustOnFirstUse bool
}

// Load reads the files and reports every problem at once.
func (f EKPolicyFiles) Load() (attest.EKPolicy, error) {
	var (
		p    = attest.EKPolicy{TrustOnFirstUse: f.TrustOnFirstUse}
		errs []error
		err  error
	)
	if f.Roots != "" {
		if p.Roots, err = loadPool(f.Roots); err != nil {
			errs = append(errs, fmt.Errorf("EK roots: %w", err))
		}
	}
	if f.Intermediates != "" {
		if p.Intermediates, err = loadPool(f.Intermediates); err != nil {
			errs = append(errs, fmt.Errorf("EK intermediates: %w", err))
		}
	}
	if f.AllowList != "" {
		if p.Allowed, err = loadAllowList(f.AllowList); err != nil {
			errs = append(errs, fmt.Errorf("EK allow-list: %w", err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return attest.EKPolicy{}, fmt.Errorf("loading EK policy: %w", err)
	}
	return p, nil
}

func loadPool(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("no PEM certificate in %s", path)
	}
	return pool, nil
}

func loadAllowList(path string) (map[string]bool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	out := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for n := 1; sc.Scan(); n++ {
		line, _, _ := strings.Cut(sc.Text(), "#")
		line = strings.ToLower(strings.TrimSpace(line))
		if line == "" {
			continue
		}
		if !ekHashPattern.MatchString(line) {
			return nil, fmt.Errorf("%s line %d: not a hex SHA-256 EK hash", path, n)
		}
		out[line] = true
	}
	return out, nil
}
