package attest

import (
	"context"
	"crypto/x509"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	agentattest "github.com/sovra-dev/sovra/agent/attest"
	"github.com/sovra-dev/sovra/daemon/attestation"
	"github.com/sovra-dev/sovra/internal/attest"
	"github.com/sovra-dev/sovra/internal/attest/attesttest"
	"github.com/sovra-dev/sovra/internal/claims"
	"github.com/sovra-dev/sovra/tests/swtpmlab"
)

// TestWriteFixtures records an enrollment and an attestation of swtpm for
// internal/attest/attesttest. It runs only when SOVRA_WRITE_FIXTURES names
// the directory to write.
func TestWriteFixtures(t *testing.T) {
	dir := os.Getenv("SOVRA_WRITE_FIXTURES")
	if dir == "" {
		t.Skip("set SOVRA_WRITE_FIXTURES to the attesttest testdata directory to record fixtures")
	}
	l := newSwtpmLab(t)
	tpm, logPath := l.use(t, 0)
	key, err := agentattest.NewKey(tpm)
	if err != nil {
		t.Fatal(err)
	}
	a := &agentattest.Agent{TPM: tpm, Claims: swtpmlab.NodeRoot(t), EventLogPath: logPath, Logger: zaptest.NewLogger(t)}
	nk, err := agentattest.NewNodeKey()
	if err != nil {
		t.Fatal(err)
	}
	// The nonce comes from a daemon's attestation service with a throwaway
	// node CA, recorded with the fixture so the daemon's tests accept it.
	ca, caKey := newCA(t, "fixture node CA")
	svc, err := attestation.New(attestation.Config{NodeCA: ca, NodeCAKey: caKey}, nil, nil, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ek, err := attest.ParseEK(key.EKCertificate, key.EKPublic)
	if err != nil {
		t.Fatal(err)
	}
	node := attestation.NodeName(ek.Hash)
	issuedAt := time.Now()
	nonce, _, err := svc.IssueNonce(context.Background(), node)
	if err != nil {
		t.Fatal(err)
	}
	req, err := a.EvidenceFor(key, node, nk, nonce)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := claims.Decode(req.Claims); err != nil {
		t.Fatal(err)
	}
	root, _ := os.ReadFile(l.Roots())
	inter, _ := os.ReadFile(l.Intermediates())
	f := &attesttest.Fixture{
		EKCertificate: key.EKCertificate, EKRootPEM: root, EKIntermediatePEM: inter,
		AKPublic: key.Params.Public, AKCreateData: key.Params.CreateData,
		AKCreateAttestation: key.Params.CreateAttestation, AKCreateSignature: key.Params.CreateSignature,
		Nonce: nonce, Claims: req.Claims, Quote: req.Quote, Signature: req.Signature,
		PCRs: map[int][]byte{}, EventLog: req.EventLog, CSR: req.Csr, IssuedAt: issuedAt,
	}
	if f.NodeCAKey, err = x509.MarshalPKCS8PrivateKey(caKey); err != nil {
		t.Fatal(err)
	}
	if f.NodeKey, err = x509.MarshalPKCS8PrivateKey(nk.Signer()); err != nil {
		t.Fatal(err)
	}
	for _, p := range req.Pcrs {
		f.PCRs[int(p.Index)] = p.Digest
	}
	b, err := attesttest.Marshal(f)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "evidence.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
}
