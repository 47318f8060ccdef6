//go:build tpmsimulator

// Package simulator serves the Microsoft reference TPM 2.0 simulator (through
// go-tpm-tools, cgo) as a TPM for tests. Build with -tags tpmsimulator; the
// production agent never links it.
package simulator

import (
	"fmt"
	"io"

	"github.com/google/go-tpm-tools/simulator"
)

// Simulator is one running simulator. Only one may exist per process at a
// time: New blocks until the previous one is closed.
type Simulator struct {
	sim *simulator.Simulator
}

// New starts a simulator whose hierarchy seeds derive from seed, so two
// simulators with different seeds are two different TPMs (different EKs).
func New(seed int64) (*Simulator, error) {
	sim, err := simulator.GetWithFixedSeedInsecure(seed)
	if err != nil {
		return nil, fmt.Errorf("starting TPM simulator: %w", err)
	}
	return &Simulator{sim: sim}, nil
}

// Open returns a channel to the simulator; closing it leaves the simulator
// running.
func (s *Simulator) Open() (io.ReadWriteCloser, error) {
	if s.sim.IsClosed() {
		return nil, fmt.Errorf("opening TPM simulator: %w", simulator.ErrUsingClosedSimulator)
	}
	return channel{s.sim}, nil
}

// Reset reboots the simulated machine: PCRs and transient objects go.
func (s *Simulator) Reset() error { return s.sim.Reset() }

// Close stops the simulator.
func (s *Simulator) Close() error { return s.sim.Close() }

type channel struct{ sim *simulator.Simulator }

func (c channel) Read(p []byte) (int, error)  { return c.sim.Read(p) }
func (c channel) Write(p []byte) (int, error) { return c.sim.Write(p) }
func (c channel) Close() error                { return nil }
