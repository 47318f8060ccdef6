package kms

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"math"

	"go.uber.org/zap"
	"golang.org/x/time/rate"
	"k8s.io/client-go/rest"

	"github.com/sovra-dev/sovra/daemon/config"
	"github.com/sovra-dev/sovra/daemon/custody"
	"github.com/sovra-dev/sovra/daemon/datadir"
)

// rateBurstSeconds is the burst of the per-source limit in seconds of its rate.
const rateBurstSeconds = 4

// NewFromConfig builds sovrad's KMS from its configuration: it loads the
// master keyring (creating it with one fresh version when the file is
// missing), and returns the service with the TLS configuration to Serve it
// with: the node API's serving certificate (nodes trust the node CA), and
// client certificates verified against the node CA when given (Talos gives
// none; agents present their node credential for volume keys). replica
// names this replica in the ledger of key releases (ReplicaName);
// kubeconfig is the KMS's client configuration for the daemon's API (the
// daemon installs the sovra.dev CRDs; the KMS waits for them).
func NewFromConfig(cfg *config.Config, files *datadir.Files, kubeconfig *rest.Config, replica string, logger *zap.Logger) (*Service, *tls.Config, error) {
	c := cfg.KMS
	if logger == nil {
		logger = zap.NewNop()
	}
	keyring, err := custody.LoadKeyring(c.MasterKeyFile)
	if errors.Is(err, fs.ErrNotExist) {
		if err := custody.CreateKeyring(c.MasterKeyFile); err != nil {
			return nil, nil, err
		}
		logger.Warn("created a new master keyring: back it up and provision the same file to every replica; without it no sealed key opens",
			zap.String("file", c.MasterKeyFile))
		keyring, err = custody.LoadKeyring(c.MasterKeyFile)
	}
	if err != nil {
		return nil, nil, err
	}
	logger.Info("master keyring loaded", zap.String("file", c.MasterKeyFile), zap.String("from", cfg.Source("master-key-file")),
		zap.Uint32s("versions", keyring.Versions()), zap.Uint32("sealsWith", keyring.Current()))
	proxies, err := ParseTrustedProxies(c.TrustedProxies)
	if err != nil {
		return nil, nil, fmt.Errorf("--kms-trusted-proxies: %w", err)
	}
	pair, err := tls.LoadX509KeyPair(files.NodeServingCert, files.NodeServingKey)
	if err != nil {
		return nil, nil, fmt.Errorf("loading the KMS serving certificate: %w", err)
	}
	if files.NodeCA == nil {
		return nil, nil, errors.New("the KMS needs the node CA to verify node credentials")
	}
	nodeCAs := x509.NewCertPool()
	nodeCAs.AddCert(files.NodeCA.Cert)
	svc, err := New(Config{
		LabMode:              c.LabMode,
		AttestDeadline:       c.AttestDeadline,
		SealWindow:           c.SealWindow,
		QuarantineUnexpected: c.QuarantineUnexpected,
		BindAddresses:        c.BindAddresses,
		TrustedProxies:       proxies,
		Replica:              replica,
		SourceRate:           rate.Limit(c.RatePerIP),
		SourceBurst:          max(DefaultSourceBurst, int(math.Ceil(c.RatePerIP*rateBurstSeconds))),
	}, kubeconfig, keyring, logger)
	if err != nil {
		return nil, nil, err
	}
	return svc, &tls.Config{
		Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12,
		ClientAuth: tls.VerifyClientCertIfGiven, ClientCAs: nodeCAs,
	}, nil
}
