package talosfake

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/siderolabs/crypto/x509"
	clientconfig "github.com/siderolabs/talos/pkg/machinery/client/config"
	talosconfig "github.com/siderolabs/talos/pkg/machinery/config"
	"github.com/siderolabs/talos/pkg/machinery/config/generate/secrets"
	"github.com/siderolabs/talos/pkg/machinery/role"
)

// PKI file names written by WritePKI.
const (
	CACertFile      = "ca.crt"
	CAKeyFile       = "ca.key"
	TalosconfigFile = "talosconfig"
)

// PKI is the Talos PKI of one fake cluster, made by the machinery secrets
// generator: the OS CA and an os:admin client talosconfig.
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
