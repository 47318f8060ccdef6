package attest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"fmt"
)

// NodeKey is the key of the node's client credential. It lives only in
// memory, for one boot: its public-key hash is a quoted claim, which binds
// the certificate the daemon issues for it to this attested boot.
type NodeKey struct {
	// priv is set once by NewNodeKey and never changes.
	priv *ecdsa.PrivateKey
}

// NewNodeKey makes a fresh P-256 key.
func NewNodeKey() (*NodeKey, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating node key: %w", err)
	}
	return &NodeKey{priv: k}, nil
}

// Signer returns the private key, for the TLS client certificate.
func (k *NodeKey) Signer() *ecdsa.PrivateKey { return k.priv }

// Hash is the hex SHA-256 of the PKIX DER of the public key.
func (k *NodeKey) Hash() (string, error) {
	der, err := x509.MarshalPKIXPublicKey(&k.priv.PublicKey)
	if err != nil {
		return "", fmt.Errorf("encoding node key: %w", err)
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:]), nil
}

// CSR returns a DER certificate request for node.
func (k *NodeKey) CSR(node string) ([]byte, error) {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: node},
	}, k.priv)
	if err != nil {
		return nil, fmt.Errorf("creating certificate request: %w", err)
	}
	return der, nil
}
