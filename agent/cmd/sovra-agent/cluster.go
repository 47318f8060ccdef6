package main

import (
	"os"

	"go.uber.org/zap"
	"google.golang.org/grpc"

	agentattest "github.com/sovra-dev/sovra/agent/attest"
	"github.com/sovra-dev/sovra/agent/config"
	"github.com/sovra-dev/sovra/agent/daemonlink"
	agentruntime "github.com/sovra-dev/sovra/agent/runtime"
)

// clusterLink builds the link to the daemon's membership list and bootstrap
// lease, on the daemon connection, which presents the attestation agent's
// node credential. It returns nil, after saying why, when the bootstrap path
// cannot run here: no daemon (edge-only mode: the CIDR scan), a worker, a
// host of the pool on the enrollment configuration (its throw-away cluster
// is never bootstrapped), no address for this node, or no talosconfig.
func clusterLink(cfg config.Config, attester *agentattest.Agent, conn grpc.ClientConnInterface, logger *zap.Logger) *daemonlink.Link {
	if attester == nil || conn == nil {
		return nil
	}

	if cfg.Role == config.RoleWorker {
		return nil
	}

	if cfg.Host.Enabled && cfg.Host.Generation == 0 {
		logger.Info("no auto-bootstrap: this host runs the enrollment configuration and waits for its own")

		return nil
	}

	self, err := agentruntime.SelfAddress(cfg, nil)
	if err != nil {
		logger.Warn("no auto-bootstrap through the daemon: this node's address is unknown (set SOVRA_NODE_ADDRESS or the network CIDR)", zap.Error(err))

		return nil
	}

	if _, err := os.Stat(cfg.TalosConfigPath); err != nil {
		logger.Warn("no auto-bootstrap through the daemon: no talosconfig for the Talos API", zap.String("talosconfig", cfg.TalosConfigPath))

		return nil
	}

	logger.Info("peers and bootstrap lease from the daemon", zap.String("daemon", cfg.DaemonEndpoint), zap.Stringer("self", self))

	return &daemonlink.Link{
		Conn:   conn,
		Self:   self,
		Logger: logger.Named("daemonlink"),
	}
}
