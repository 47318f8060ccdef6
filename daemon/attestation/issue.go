package attestation

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"math/big"
	"time"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/nodeauth"
	"github.com/sovra-dev/sovra/internal/claims"
)

// serialBits is the size of certificate serial numbers.
const serialBits = 128

// checkCSR parses the node's certificate request and checks that its key is
// the one whose hash the node quoted.
func checkCSR(der []byte, cs claims.Set) (*x509.CertificateRequest, error) {
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("%w: certificate request: %v", ErrInvalid, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: certificate request signature: %v", ErrInvalid, err)
	}
	pub, err := x509.MarshalPKIXPublicKey(csr.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("%w: certificate request key: %v", ErrInvalid, err)
	}
	sum := sha256.Sum256(pub)
	quoted, ok := cs.Value(claims.NodeKeySHA256)
	if !ok || quoted != hex.EncodeToString(sum[:]) {
		return nil, fmt.Errorf("%w: certificate request key is not the node key whose hash was quoted", ErrRefused)
	}
	return csr, nil
}

// issue signs the node credential of node's record instance and boot with
// the CSR's key.
func (s *Service) issue(node *v1alpha1.SovraNode, boot string, csr *x509.CertificateRequest) ([][]byte, time.Time, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), serialBits))
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("issuing certificate for node %s: %w", node.Name, err)
	}
	now := s.clock.Now()
	ttl := s.cfg.CertTTL
	if exp := now.Add(ttl); exp.After(s.cfg.NodeCA.NotAfter) {
		ttl = s.cfg.NodeCA.NotAfter.Sub(now)
	}
	tmpl := nodeauth.Template(nodeauth.Credential{Node: node.Name, UID: node.UID, Boot: boot}, serial, now, ttl)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, s.cfg.NodeCA, csr.PublicKey, s.cfg.NodeCAKey)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("issuing certificate for node %s: %w", node.Name, err)
	}
	return [][]byte{der, s.cfg.NodeCA.Raw}, tmpl.NotAfter, nil
}
