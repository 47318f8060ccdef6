package main

import (
	"errors"
	"testing"

	"github.com/sovra-dev/sovra/agent/config"
	"github.com/sovra-dev/sovra/agent/platform"
)

func TestAttestationUnavailableChecksTheConfiguredTPM(t *testing.T) {
	cfg := config.Default()

	cfg.Attestation.TPM = "device:/nonexistent/tpmrm0"
	if err := attestationUnavailable(cfg); !errors.Is(err, platform.ErrNoTPM) {
		t.Fatalf("no TPM at the configured path: %v", err)
	}

	// A software TPM is the operator's choice: nothing is checked.
	cfg.Attestation.TPM = "swtpm:127.0.0.1:2321"
	if err := attestationUnavailable(cfg); err != nil {
		t.Fatalf("swtpm: %v", err)
	}
}
