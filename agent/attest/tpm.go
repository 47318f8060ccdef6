// Package attest is the agent's side of enrollment and attestation: it makes
// an attestation key (AK) in the node's TPM and enrolls it with the daemon by
// credential activation, collects the node's claims, quotes PCRs 0-7 and 11
// bound to a daemon nonce and to the claims, and turns a passing attestation
// into a short-lived client certificate for an in-memory node key.
package attest

import (
	"errors"
	"fmt"
	"io"

	"github.com/google/go-attestation/attest"
)

// TPM opens a command channel to the node's TPM. Implementations live in
// agent/tpm/device, agent/tpm/swtpm and agent/tpm/simulator.
type TPM interface {
	Open() (io.ReadWriteCloser, error)
}

// errNoLog is returned by channel.MeasurementLog: the agent reads the event
// log from its own configured path, never through go-attestation.
var errNoLog = errors.New("event log is read from EventLogPath")

// channel adapts a raw channel to go-attestation's CommandChannelTPM20.
type channel struct{ io.ReadWriteCloser }

func (channel) MeasurementLog() ([]byte, error) { return nil, errNoLog }

func openTPM(t TPM) (*attest.TPM, error) {
	rw, err := t.Open()
	if err != nil {
		return nil, fmt.Errorf("opening TPM: %w", err)
	}
	tpm, err := attest.OpenTPM(&attest.OpenConfig{CommandChannel: channel{rw}})
	if err != nil {
		rw.Close()
		return nil, fmt.Errorf("opening TPM: %w", err)
	}
	return tpm, nil
}
