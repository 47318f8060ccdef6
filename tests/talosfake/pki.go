package talosfake

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/siderolabs/crypto/x509"
	clientconfig "github.com/siderolabs/talos/pkg/machinery/client/config"
	talosconfig "github.com/siderolabs/talos/pkg/machinery/config"
	"github.com/siderolabs/talos/pkg/machinery/config/generate/secrets"
	"github.com/siderolabs/talos/pkg/machinery/role"
	"go.yaml.in/yaml/v4"
)

// PKI file names written by WritePKI.
const (
	CACertFile      = "ca.crt"
	CAKeyFile       = "ca.key"
	TalosconfigFile = "talosconfig"
)

// PKI is the Talos PKI of one fake cluster, from a machinery secrets bundle:
// the OS CA and an os:admin client talosconfig.
type PKI struct {
	// CA is the cluster's Talos (OS) CA with its key.
	CA *x509.PEMEncodedCertificateAndKey
	// Talosconfig is the client configuration the agents use.
	Talosconfig *clientconfig.Config
}

// NewPKI generates a cluster's secrets with the machinery secrets generator.
func NewPKI(clusterName string) (*PKI, error) {
	bundle, err := secrets.NewBundle(secrets.NewFixedClock(time.Now()), talosconfig.TalosVersionCurrent)
	if err != nil {
		return nil, fmt.Errorf("generating the secrets bundle: %w", err)
	}

	return pkiFromBundle(clusterName, bundle)
}

// PKIFromBundle loads the PKI of a cluster whose secrets the Cluster API
// bootstrap provider generated: bundleYAML is its secrets bundle, key
// "bundle" of Secret "<cluster>-talos". The talosconfig gets a fresh
// os:admin client certificate, so fake nodes and agents made from the PKI
// trust, and are trusted by, the talosconfig the providers use.
func PKIFromBundle(clusterName string, bundleYAML []byte) (*PKI, error) {
	// The providers decode the bundle the same way, with a clock for the
	// certificates they issue from it.
	bundle := &secrets.Bundle{Clock: secrets.NewFixedClock(time.Now())}
	if err := yaml.Unmarshal(bundleYAML, bundle); err != nil {
		return nil, fmt.Errorf("decoding the secrets bundle: %w", err)
	}

	if bundle.Certs == nil || bundle.Certs.OS == nil {
		return nil, errors.New("decoding the secrets bundle: it has no Talos (OS) CA")
	}

	return pkiFromBundle(clusterName, bundle)
}

// pkiFromBundle is the PKI of a secrets bundle: its OS CA, and a
// talosconfig with an os:admin client certificate from that CA.
func pkiFromBundle(clusterName string, bundle *secrets.Bundle) (*PKI, error) {
	admin, err := bundle.GenerateTalosAPIClientCertificate(role.MakeSet(role.Admin))
	if err != nil {
		return nil, fmt.Errorf("generating the admin client certificate: %w", err)
	}

	return &PKI{
		CA:          bundle.Certs.OS,
		Talosconfig: clientconfig.NewConfig(clusterName, []string{"127.0.0.1"}, bundle.Certs.OS.Crt, admin),
	}, nil
}

// Write stores the CA and the talosconfig in dir (mode 0600).
func (p *PKI) Write(dir string) error {
	if err := os.WriteFile(filepath.Join(dir, CACertFile), p.CA.Crt, 0o600); err != nil {
		return fmt.Errorf("writing the CA certificate: %w", err)
	}

	if err := os.WriteFile(filepath.Join(dir, CAKeyFile), p.CA.Key, 0o600); err != nil {
		return fmt.Errorf("writing the CA key: %w", err)
	}

	if err := p.Talosconfig.Save(filepath.Join(dir, TalosconfigFile)); err != nil {
		return fmt.Errorf("writing the talosconfig: %w", err)
	}

	return nil
}

// ReadCA loads a CA written by Write.
func ReadCA(dir string) (*x509.PEMEncodedCertificateAndKey, error) {
	ca, err := x509.NewCertificateAndKeyFromFiles(filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile))
	if err != nil {
		return nil, fmt.Errorf("reading the CA from %s: %w", dir, err)
	}

	return ca, nil
}
