package attestation

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"fmt"
	"math/big"
	"time"

	"github.com/sovra-dev/sovra/internal/claims"
)

const (
	// serialBits is the size of certificate serial numbers.
	serialBits = 128
	// NodeOrganization is the O of every node client certificate.
	NodeOrganization = "sovra:nodes"
)

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

// issue signs a client certificate for node with the CSR's key.
func (s *Service) issue(node string, csr *x509.CertificateRequest) ([][]byte, time.Time, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), serialBits))
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("issuing certificate for node %s: %w", node, err)
	}
	now := s.clock.Now()
	exp := now.Add(s.cfg.CertTTL)
	if exp.After(s.cfg.NodeCA.NotAfter) {
		exp = s.cfg.NodeCA.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: node, Organization: []string{NodeOrganization}},
		NotBefore:    now.Add(-certBackdate),
		NotAfter:     exp,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, s.cfg.NodeCA, csr.PublicKey, s.cfg.NodeCAKey)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("issuing certificate for node %s: %w", node, err)
	}
	return [][]byte{der, s.cfg.NodeCA.Raw}, exp, nil
}
