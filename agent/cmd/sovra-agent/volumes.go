package main

import (
	"errors"
	"io"
	"sort"

	"github.com/cosi-project/runtime/pkg/controller"
	"go.uber.org/zap"

	agentattest "github.com/sovra-dev/sovra/agent/attest"
	"github.com/sovra-dev/sovra/agent/config"
	volumesctrl "github.com/sovra-dev/sovra/agent/controllers/volumes"
	"github.com/sovra-dev/sovra/agent/daemonconn"
	"github.com/sovra-dev/sovra/agent/runtime/clock"
	agentvolumes "github.com/sovra-dev/sovra/agent/volumes"
)

// volumeControllers builds the controller of the agent-managed volumes, when
// any is configured: their keys come from the daemon's key service over the
// daemon connection, which presents the node credential of this boot's
// attestation. conn is the connection to the daemon endpoint; a key
// endpoint elsewhere gets its own, configured the same way.
func volumeControllers(cfg config.Config, attester *agentattest.Agent, conn *daemonconn.Conn, logger *zap.Logger) ([]controller.Controller, io.Closer, error) {
	if len(cfg.Volumes.Devices) == 0 {
		return nil, nil, nil
	}

	if attester == nil || conn == nil {
		return nil, nil, errors.New("volumes need attestation: configure the daemon endpoint")
	}

	var closer io.Closer

	if cfg.KeyEndpoint() != conn.Endpoint() {
		var err error
		if conn, err = daemonConn(cfg, cfg.KeyEndpoint(), attester.ClientCertificate); err != nil {
			return nil, nil, err
		}

		closer = conn
	}

	vols := make([]agentvolumes.Volume, 0, len(cfg.Volumes.Devices))
	for id, dev := range cfg.Volumes.Devices {
		vols = append(vols, agentvolumes.Volume{ID: id, Device: dev})
	}

	sort.Slice(vols, func(i, j int) bool { return vols[i].ID < vols[j].ID })

	logger.Info("agent-managed volumes on", zap.Int("volumes", len(vols)), zap.String("keys", cfg.KeyEndpoint()))

	return []controller.Controller{&volumesctrl.VolumeController{
		Volumes: vols,
		Preparer: &agentvolumes.Manager{
			Keys:   &agentvolumes.Remote{Conn: conn},
			Logger: logger.Named("volumes"),
		},
		MappedPrefix: cfg.Volumes.MapPrefix,
		Clock:        clock.Real{},
	}}, closer, nil
}
