package main

import (
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"sort"

	"github.com/cosi-project/runtime/pkg/controller"
	"go.uber.org/zap"

	agentattest "github.com/sovra-dev/sovra/agent/attest"
	"github.com/sovra-dev/sovra/agent/config"
	volumesctrl "github.com/sovra-dev/sovra/agent/controllers/volumes"
	"github.com/sovra-dev/sovra/agent/runtime/clock"
	agentvolumes "github.com/sovra-dev/sovra/agent/volumes"
)

// volumeControllers builds the controller of the agent-managed volumes, when
// any is configured: their keys come from the daemon's key service over
// mutual TLS with the node credential of this boot's attestation.
func volumeControllers(cfg config.Config, attester *agentattest.Agent, logger *zap.Logger) ([]controller.Controller, error) {
	if len(cfg.Volumes.Devices) == 0 {
		return nil, nil
	}

	if attester == nil {
		return nil, errors.New("volumes need attestation: configure the daemon endpoint")
	}

	pem, err := os.ReadFile(cfg.Attestation.DaemonCA)
	if err != nil {
		return nil, fmt.Errorf("reading the daemon CA: %w", err)
	}

	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("reading the daemon CA: no certificate in %s", cfg.Attestation.DaemonCA)
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
			Keys:   &agentvolumes.Remote{Addr: cfg.KeyEndpoint(), Roots: roots, Credential: attester.ClientCertificate},
			Logger: logger.Named("volumes"),
		},
		MappedPrefix: cfg.Volumes.MapPrefix,
		Clock:        clock.Real{},
	}}, nil
}
