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
	"github.com/sovra-dev/sovra/agent/runtime/clock"
	"github.com/sovra-dev/sovra/agent/tpm"
)

// productUUIDPath is where the kernel exposes the SMBIOS system UUID, the one
// Talos sends with its KMS calls.
const productUUIDPath = "/sys/class/dmi/id/product_uuid"

// attestationControllers builds the attestation controller when a daemon is
// configured: the TPM, the node API connection and the node's identity
// claims, and returns the attestation agent, whose node credential
// authenticates the agent's other daemon calls. It returns no controller and
// a nil agent in edge-only mode.
func attestationControllers(cfg config.Config, logger *zap.Logger) ([]controller.Controller, *agentattest.Agent, error) {
	if cfg.DaemonEndpoint == "" {
		logger.Info("no daemon endpoint: attestation off (edge-only mode)")

		return nil, nil, nil
	}

	opener, err := tpm.FromSpec(cfg.Attestation.TPM)
	if err != nil {
		return nil, nil, err
	}

	conn, err := agentattest.Dial(cfg.DaemonEndpoint, cfg.Attestation.DaemonCA, daemonServerName(cfg))
	if err != nil {
		return nil, nil, fmt.Errorf("connecting to the daemon: %w", err)
	}

	node, err := nodeIdentity(cfg)
	if err != nil {
		return nil, nil, err
	}

	agent := &agentattest.Agent{
		TPM:          opener,
		Client:       agentattest.NewClient(conn),
		Claims:       agentattest.Collector{},
		EventLogPath: cfg.Attestation.EventLog,
		Node:         node,
		Logger:       logger.Named("attest"),
	}

	logger.Info("attestation on", zap.String("daemon", cfg.DaemonEndpoint), zap.String("uuid", node.UUID), zap.Duration("interval", cfg.Attestation.Interval))

	return []controller.Controller{&attestationctrl.AttestationController{
		Attester: agent,
		Clock:    clock.Real{},
		Interval: cfg.Attestation.Interval,
		Backoff:  agentattest.Backoff{},
	}}, agent, nil
}

// daemonServerName is the name the daemon's certificate must carry.
func daemonServerName(cfg config.Config) string {
	if cfg.Attestation.DaemonServerName != "" {
		return cfg.Attestation.DaemonServerName
	}

	host, _, _ := net.SplitHostPort(cfg.DaemonEndpoint)

	return host
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
