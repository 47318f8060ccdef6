package main

import (
	"go.uber.org/zap"

	"github.com/sovra-dev/sovra/agent/config"
	"github.com/sovra-dev/sovra/agent/platform"
	"github.com/sovra-dev/sovra/agent/tpm"
	"github.com/sovra-dev/sovra/agent/tpm/device"
)

// Effects of attestation being unavailable, as the start-up warning says them.
const (
	unavailableEdgeOnly = "edge-only mode: discovery, election and etcd bootstrap run; they need neither a TPM nor UEFI"
	unavailableDaemon   = "this node cannot enroll or attest, so it gets no node credential: no volume keys, no host mode, and no membership " +
		"or bootstrap lease from the daemon (the Talos control-plane provider bootstraps the cluster)"
)

// attestationUnavailable checks, once at start, whether this machine can
// attest: a TPM device (the one --tpm names) and UEFI variables. It returns
// nil when it can. A software TPM (--tpm swtpm:...) is the operator's
// choice: neither it nor the firmware under it is checked.
func attestationUnavailable(cfg config.Config) error {
	opener, err := tpm.FromSpec(cfg.Attestation.TPM)
	if err != nil {
		return nil //nolint:nilerr // an invalid --tpm is reported where attestation is set up
	}

	dev, ok := opener.(device.Device)
	if !ok {
		return nil
	}

	return platform.Probe{TPMPaths: dev.Paths}.Attestation()
}

// warnUnavailable is the one warning at start that says attestation is
// unavailable on this machine, why, and what the agent does without it.
func warnUnavailable(cfg config.Config, why error, logger *zap.Logger) {
	effect := unavailableEdgeOnly
	if cfg.DaemonEndpoint != "" {
		effect = unavailableDaemon
	}

	logger.Warn("attestation unavailable on this machine",
		zap.String("reason", why.Error()), zap.String("daemon", cfg.DaemonEndpoint), zap.String("effect", effect))
}
