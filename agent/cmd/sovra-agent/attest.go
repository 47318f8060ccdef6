package main

import (
	"fmt"
	"net"
	"os"
	"strings"

	"github.com/cosi-project/runtime/pkg/controller"
	"go.uber.org/zap"

	agentattest "github.com/sovra-dev/sovra/agent/attest"
	"github.com/sovra-dev/sovra/agent/config"
	attestationctrl "github.com/sovra-dev/sovra/agent/controllers/attestation"
	"github.com/sovra-dev/sovra/agent/daemonconn"
	"github.com/sovra-dev/sovra/agent/runtime/clock"
	"github.com/sovra-dev/sovra/agent/tpm"
)

// productUUIDPath is where the kernel exposes the SMBIOS system UUID, the one
// Talos sends with its KMS calls.
const productUUIDPath = "/sys/class/dmi/id/product_uuid"

// attestationControllers builds the attestation controller when a daemon is
// configured: the TPM, the daemon connection and the node's identity
// claims. It returns the attestation agent, whose node credential
// authenticates the agent's other daemon calls, and the daemon connection,
// which presents that credential once there is one and which the agent's
// other daemon clients share. It returns no controller, a nil agent and a
// nil connection in edge-only mode.
func attestationControllers(cfg config.Config, logger *zap.Logger) ([]controller.Controller, *agentattest.Agent, *daemonconn.Conn, error) {
	if cfg.DaemonEndpoint == "" {
		logger.Info("no daemon endpoint: attestation off (edge-only mode)")

		return nil, nil, nil, nil
	}

	opener, err := tpm.FromSpec(cfg.Attestation.TPM)
	if err != nil {
		return nil, nil, nil, err
	}

	node, err := nodeIdentity(cfg)
	if err != nil {
		return nil, nil, nil, err
	}

	agent := &agentattest.Agent{
		TPM:          opener,
		Claims:       agentattest.Collector{},
		EventLogPath: cfg.Attestation.EventLog,
		Node:         node,
		Logger:       logger.Named("attest"),
	}

	conn, err := daemonConn(cfg, cfg.DaemonEndpoint, agent.ClientCertificate)
	if err != nil {
		return nil, nil, nil, err
	}

	agent.Client = agentattest.NewClient(conn)

	logger.Info("attestation on", zap.String("daemon", cfg.DaemonEndpoint), zap.String("uuid", node.UUID), zap.Duration("interval", cfg.Attestation.Interval))

	return []controller.Controller{&attestationctrl.AttestationController{
		Attester: agent,
		Clock:    clock.Real{},
		Interval: cfg.Attestation.Interval,
		Backoff:  daemonconn.Backoff{},
	}}, agent, conn, nil
}

// daemonConn opens the agent's connection to the daemon's node API at
// endpoint: TLS 1.3, verified with --daemon-ca for --daemon-server-name
// (default: the endpoint's host), presenting the node credential of cred
// when there is one.
func daemonConn(cfg config.Config, endpoint string, cred daemonconn.CredentialFunc) (*daemonconn.Conn, error) {
	roots, err := daemonconn.LoadRoots(cfg.Attestation.DaemonCA)
	if err != nil {
		return nil, err
	}

	return daemonconn.New(daemonconn.Config{
		Endpoint:   endpoint,
		Roots:      roots,
		ServerName: cfg.Attestation.DaemonServerName,
		Credential: cred,
	})
}

// nodeIdentity is what the node claims about itself at enrollment: its
// SMBIOS UUID, host name and addresses. The daemon binds them to the EK.
func nodeIdentity(cfg config.Config) (agentattest.Node, error) {
	id := cfg.Attestation.NodeUUID
	if id == "" {
		b, err := os.ReadFile(productUUIDPath)
		if err != nil {
			return agentattest.Node{}, fmt.Errorf("reading the node UUID (set --node-uuid to give it): %w", err)
		}

		id = strings.ToLower(strings.TrimSpace(string(b)))
	}

	host, _ := os.Hostname()

	var addrs []string

	ifaddrs, _ := net.InterfaceAddrs()
	for _, a := range ifaddrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.IsGlobalUnicast() {
			addrs = append(addrs, n.IP.String())
		}
	}

	return agentattest.Node{UUID: id, Hostname: host, Addresses: addrs}, nil
}
