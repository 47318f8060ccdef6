package main

import (
	"errors"
	"net/netip"
	"time"

	"github.com/cosi-project/runtime/pkg/controller"
	"go.uber.org/zap"

	agentattest "github.com/sovra-dev/sovra/agent/attest"
	"github.com/sovra-dev/sovra/agent/config"
	hostctrl "github.com/sovra-dev/sovra/agent/controllers/host"
	"github.com/sovra-dev/sovra/agent/daemonconn"
	"github.com/sovra-dev/sovra/agent/runtime/clock"
	"github.com/sovra-dev/sovra/agent/runtime/talosapi"
)

// hostTalosTimeout bounds each call to the local Talos API in host mode:
// ApplyConfiguration validates the whole machine configuration first.
const hostTalosTimeout = 30 * time.Second

// localTalosAPI is where the agent reaches its own machine's Talos API in
// host mode: the configurations sovrad serves close the Talos API to the
// network and name this address in the agent's talosconfig.
var localTalosAPI = netip.MustParseAddr("127.0.0.1")

// hostControllers builds the controller of host mode when it is on: it
// syncs with the daemon's host service over the daemon connection, which
// presents the node credential of this boot's attestation, and applies
// what the daemon answers through the local Talos API.
func hostControllers(cfg config.Config, attester *agentattest.Agent, conn *daemonconn.Conn, logger *zap.Logger) ([]controller.Controller, error) {
	if !cfg.Host.Enabled {
		return nil, nil
	}

	if attester == nil || conn == nil {
		return nil, errors.New("host mode needs attestation: configure the daemon endpoint")
	}

	tlsConfig, err := talosapi.LoadTLS(cfg.TalosConfigPath)
	if err != nil {
		return nil, err
	}

	logger.Info("host mode on", zap.String("daemon", cfg.DaemonEndpoint), zap.Int64("generation", cfg.Host.Generation),
		zap.Stringer("talos", localTalosAPI))

	return []controller.Controller{&hostctrl.HostController{
		Conn:       conn,
		Talos:      &talosapi.Client{TLS: tlsConfig, Port: cfg.TalosAPIPort, Timeout: hostTalosTimeout, Local: localTalosAPI},
		Generation: cfg.Host.Generation,
		Clock:      clock.Real{},
		StateDir:   cfg.StateDir,
	}}, nil
}
