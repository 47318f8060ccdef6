package pki

import (
	"bytes"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestEnsureCAReusesAndRefusesHalfPairs(t *testing.T) {
	dir := t.TempDir()
	ca, err := EnsureCA(dir, "test-ca")
	if err != nil {
		t.Fatal(err)
	}
	again, err := EnsureCA(dir, "test-ca")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(ca.PEM, again.PEM) {
		t.Fatal("a second EnsureCA replaced the CA")
	}
	if fi, _ := os.Stat(filepath.Join(dir, CAKey)); fi.Mode().Perm() != 0o600 {
		t.Fatalf("CA key mode %v, want 0600", fi.Mode().Perm())
	}
	os.Remove(filepath.Join(dir, CACert))
	if _, err := EnsureCA(dir, "test-ca"); err == nil || !strings.Contains(err.Error(), "its key") {
		t.Fatalf("a CA key without its certificate: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, CACert)); err == nil {
		t.Fatal("EnsureCA wrote a new certificate beside an old key")
	}
}

func TestEnsureLeafReissuesForNewNamesAndKeepsTheKey(t *testing.T) {
	dir := t.TempDir()
	ca, err := EnsureCA(dir, "test-ca")
	if err != nil {
		t.Fatal(err)
	}
	cert, key := filepath.Join(dir, "srv.crt"), filepath.Join(dir, "srv.key")
	leaf := Leaf{CommonName: "srv", DNSNames: []string{"localhost"}, IPs: []net.IP{net.ParseIP("127.0.0.1")}, Usage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	if issued, err := ca.EnsureLeaf(cert, key, leaf); err != nil || !issued {
		t.Fatalf("first issue: %v %v", issued, err)
	}
	keyPEM, _ := os.ReadFile(key)
	if issued, err := ca.EnsureLeaf(cert, key, leaf); err != nil || issued {
		t.Fatalf("same names reissued: %v %v", issued, err)
	}
	leaf.DNSNames = append(leaf.DNSNames, "api.example.org")
	leaf.IPs = append(leaf.IPs, net.ParseIP("10.0.0.5"))
	if issued, err := ca.EnsureLeaf(cert, key, leaf); err != nil || !issued {
		t.Fatalf("new SANs not reissued: %v %v", issued, err)
	}
	if got, _ := os.ReadFile(key); !bytes.Equal(got, keyPEM) {
		t.Fatal("reissue replaced the key")
	}
	data, _ := os.ReadFile(cert)
	c, err := parseCert(data)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.VerifyHostname("api.example.org"); err != nil {
		t.Fatal(err)
	}
	if err := c.VerifyHostname("10.0.0.5"); err != nil {
		t.Fatal(err)
	}
	if err := c.CheckSignatureFrom(ca.Cert); err != nil {
		t.Fatal(err)
	}

	other, _ := EnsureCA(t.TempDir(), "other-ca")
	if issued, err := other.EnsureLeaf(cert, key, leaf); err != nil || !issued {
		t.Fatalf("a certificate from another CA was kept: %v %v", issued, err)
	}
}

func TestEnsureKeyPersists(t *testing.T) {
	dir := t.TempDir()
	k, p := filepath.Join(dir, "sa.key"), filepath.Join(dir, "sa.pub")
	if err := EnsureKey(k, p); err != nil {
		t.Fatal(err)
	}
	first, _ := os.ReadFile(k)
	os.Remove(p)
	if err := EnsureKey(k, p); err != nil {
		t.Fatal(err)
	}
	if second, _ := os.ReadFile(k); !bytes.Equal(first, second) {
		t.Fatal("EnsureKey replaced an existing key")
	}
	if _, err := os.Stat(p); err != nil {
		t.Fatal("the public key was not rewritten")
	}
}
