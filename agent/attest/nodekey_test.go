package attest

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"testing"
)

func TestNodeKeyCSR(t *testing.T) {
	k, err := NewNodeKey()
	if err != nil {
		t.Fatal(err)
	}
	der, err := k.CSR("ek-1")
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil || csr.CheckSignature() != nil {
		t.Fatalf("CSR: %v", err)
	}
	pub, _ := x509.MarshalPKIXPublicKey(csr.PublicKey)
	sum := sha256.Sum256(pub)
	if h, _ := k.Hash(); h != hex.EncodeToString(sum[:]) {
		t.Fatal("the quoted hash is not the hash of the CSR's key")
	}
}
