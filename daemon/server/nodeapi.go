package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"

	"go.uber.org/zap"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/sovra-dev/sovra/daemon/attestation"
	"github.com/sovra-dev/sovra/daemon/config"
	"github.com/sovra-dev/sovra/daemon/connlimit"
	"github.com/sovra-dev/sovra/daemon/datadir"
	"github.com/sovra-dev/sovra/daemon/kms"
	"github.com/sovra-dev/sovra/daemon/nodeapi"
	"github.com/sovra-dev/sovra/daemon/nodeauth"
)

// newNodeAPI builds the node API from the configuration: its TLS identity
// from the node CA in the data directory, and the EK policy from its files;
// kubeconfig is its client configuration for the daemon's API.
func newNodeAPI(all *config.Config, files *datadir.Files, kubeconfig *rest.Config, auth *nodeauth.Authenticator, log *zap.Logger) (*nodeapi.Server, error) {
	cfg := all.NodeAPI
	ek, err := attestation.EKPolicyFiles{
		Roots:           cfg.EKRoots,
		Intermediates:   cfg.EKIntermediates,
		AllowList:       cfg.EKAllowList,
		TrustOnFirstUse: cfg.EKTrustOnFirstUse,
	}.Load()
	if err != nil {
		return nil, err
	}
	switch {
	case cfg.EKTrustOnFirstUse:
		log.Warn("EK TRUST ON FIRST USE: any TPM, or anything claiming to be one, may enroll. Labs only: this proves nothing about a machine's identity")
	case cfg.EKRoots == "" && cfg.EKAllowList == "":
		log.Warn("no EK policy configured (--ek-roots, --ek-allow-list): every enrollment will be refused")
	}
	cert, err := tls.LoadX509KeyPair(files.NodeServingCert, files.NodeServingKey)
	if err != nil {
		return nil, fmt.Errorf("loading the node API certificate: %w", err)
	}
	nodeCAs := x509.NewCertPool()
	nodeCAs.AddCert(files.NodeCA.Cert)

	return nodeapi.NewServer(nodeapi.Config{
		Listen:   cfg.Listen,
		PeerRate: cfg.RatePerIP,
		Auth:     auth,
		// A node credential, when a call presents one, must chain to the node
		// CA; calls before the first attestation (enrollment) present none.
		TLS: &tls.Config{
			Certificates: []tls.Certificate{cert},
			MinVersion:   tls.VersionTLS12,
			ClientAuth:   tls.VerifyClientCertIfGiven,
			ClientCAs:    nodeCAs,
		},
		Attestation: attestation.Config{
			EK:         ek,
			NonceTTL:   cfg.NonceTTL,
			CertTTL:    cfg.NodeCertTTL,
			NodeCA:     files.NodeCA.Cert,
			NodeCAKey:  files.NodeCA.Key,
			SealWindow: all.KMS.SealWindow,
		},
	}, kubeconfig, log.Named("nodeapi"))
}

// newAuthenticator builds the one check of node credentials that every
// node-authenticated service shares, reading records from the API at
// kubeconfig.
func newAuthenticator(files *datadir.Files, kubeconfig *rest.Config, log *zap.Logger) (*nodeauth.Authenticator, error) {
	scheme, err := attestation.Scheme()
	if err != nil {
		return nil, err
	}
	cfg := rest.CopyConfig(kubeconfig)
	cfg.ContentType = runtime.ContentTypeJSON
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		return nil, fmt.Errorf("creating a client for node credentials: %w", err)
	}
	return nodeauth.New(files.NodeCA.Cert, nodeauth.APIRecords{Client: c}, nil, log.Named("nodeauth")), nil
}

// runNodeAPI waits for the attestation CRDs (the bootstrap installs them)
// and serves the node API on addr, through limiter, until ctx ends. It opens
// listening once the node API accepts connections.
func runNodeAPI(ctx context.Context, srv *nodeapi.Server, kubeconfig *rest.Config, addr string, limiter *connlimit.Limiter, listening *gate) error {
	c, err := attestationClient(kubeconfig)
	if err != nil {
		return err
	}
	if err := attestation.WaitForCRDs(ctx, c); err != nil {
		return err
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listening for the node API on %s: %w", addr, err)
	}
	listening.Open()
	return srv.Serve(ctx, limiter.Wrap(lis, "node API"))
}

// attestationClient is a client of the sovra.dev API for the CRDs.
func attestationClient(kubeconfig *rest.Config) (client.Client, error) {
	scheme, err := attestation.Scheme()
	if err != nil {
		return nil, err
	}
	c, err := client.New(kubeconfig, client.Options{Scheme: scheme})
	if err != nil {
		return nil, fmt.Errorf("creating a client for the attestation CRDs: %w", err)
	}
	return c, nil
}

// newConnLimiter bounds the connections the node API and KMS listeners hold
// together (--node-max-conns-per-ip, --node-max-conns); trusted proxies
// carry many nodes' calls and are held to the total only.
func newConnLimiter(cfg *config.Config, log *zap.Logger) (*connlimit.Limiter, error) {
	proxies, err := kms.ParseTrustedProxies(cfg.KMS.TrustedProxies)
	if err != nil {
		return nil, fmt.Errorf("--kms-trusted-proxies: %w", err)
	}
	log.Info("node connections bounded",
		zap.Int("perSource", cfg.NodeAPI.MaxConnsPerIP),
		zap.Int("total", cfg.NodeAPI.MaxConns),
		zap.Duration("handshakeTimeout", connlimit.HandshakeTimeout),
		zap.Duration("maxIdle", connlimit.MaxConnectionIdle))
	return connlimit.New(connlimit.Config{
		PerSource: cfg.NodeAPI.MaxConnsPerIP,
		Total:     cfg.NodeAPI.MaxConns,
		Exempt:    proxies,
	}, log.Named("connlimit")), nil
}
