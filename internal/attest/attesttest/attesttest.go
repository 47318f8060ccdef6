// Package attesttest holds recorded evidence from a real TPM (swtpm with an
// EK certificate from its local CA) for tests, fuzz seeds and benchmarks that
// must run without a TPM. tests/attest regenerates it:
//
//	SOVRA_WRITE_FIXTURES=$PWD/internal/attest/attesttest/testdata go test -run TestWriteFixtures ./tests/attest/
package attesttest

import (
	_ "embed"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

//go:embed testdata/evidence.json
var evidenceJSON []byte

// Fixture is one enrollment and one attestation of the same TPM.
type Fixture struct {
	// EKCertificate is the DER EK certificate; EKRootPEM and
	// EKIntermediatePEM are the CA that issued it.
	EKCertificate     []byte
	EKRootPEM         []byte
	EKIntermediatePEM []byte
	// AK creation parameters (go-attestation AttestationParameters).
	AKPublic, AKCreateData, AKCreateAttestation, AKCreateSignature []byte
	// The attestation: nonce, canonical claims, quote, PCRs, event log.
	Nonce, Claims, Quote, Signature []byte
	PCRs                            map[int][]byte
	EventLog                        []byte
	// NodeKey is the PKCS#8 DER of the in-memory node key whose hash is
	// in Claims (a throwaway test key), and CSR a request signed by it.
	NodeKey, CSR []byte
	// NodeCAKey is the PKCS#8 DER of the (throwaway) node CA key the daemon
	// that issued Nonce held, and IssuedAt when it issued it: a service
	// with that key and clock accepts the nonce.
	NodeCAKey []byte
	IssuedAt  time.Time
}

// Load returns a fresh copy of the recorded fixture.
func Load() (*Fixture, error) {
	var f Fixture
	if err := json.Unmarshal(evidenceJSON, &f); err != nil {
		return nil, fmt.Errorf("decoding attestation fixture: %w", err)
	}
	return &f, nil
}

// Marshal encodes a fixture in the embedded format.
func Marshal(f *Fixture) ([]byte, error) {
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encoding attestation fixture: %w", err)
	}
	return b, nil
}

// WriteSeed writes one entry of a go test fuzz seed corpus:
// testdata/fuzz/<target>/<name> under dir, one []byte argument per line.
func WriteSeed(dir, target, name string, args ...[]byte) error {
	var b strings.Builder
	b.WriteString("go test fuzz v1\n")
	for _, a := range args {
		fmt.Fprintf(&b, "[]byte(%s)\n", strconv.Quote(string(a)))
	}
	p := filepath.Join(dir, "testdata", "fuzz", target)
	if err := os.MkdirAll(p, 0o755); err != nil {
		return fmt.Errorf("writing fuzz seed: %w", err)
	}
	if err := os.WriteFile(filepath.Join(p, name), []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("writing fuzz seed: %w", err)
	}
	return nil
}
