package datadir

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"testing"

	"go.uber.org/zap"

	"github.com/sovra-dev/sovra/daemon/config"
)

// TestNodeServingCertificateNames: node-api.crt names the advertise address
// and every --node-tls-san, the API's certificate does not take the node
// API's names, and a certificate that no longer covers the configured names
// is reissued with the same key.
func TestNodeServingCertificateNames(t *testing.T) {
	cfg := config.New()
	cfg.DataDir = filepath.Join(t.TempDir(), "data")
	cfg.AdvertiseAddress = "192.0.2.10"
	cfg.NodeAPI.Listen = "198.51.100.7:7443"
	cfg.NodeAPI.TLSSANs = []string{"kms.example.internal", "2001:db8::7"}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	f, err := Prepare(cfg, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	node := readCert(t, f.NodeServingCert)
	for _, name := range []string{"localhost", "127.0.0.1", "192.0.2.10", "198.51.100.7", "kms.example.internal", "2001:db8::7"} {
		if err := node.VerifyHostname(name); err != nil {
			t.Errorf("node-api.crt: %v", err)
		}
	}
	if err := node.CheckSignatureFrom(f.NodeCA.Cert); err != nil {
		t.Fatalf("node-api.crt is not signed by the node CA: %v", err)
	}
	api := readCert(t, f.ServingCert)
	for _, name := range []string{"kms.example.internal", "198.51.100.7"} {
		if api.VerifyHostname(name) == nil {
			t.Errorf("apiserver.crt names %s, a name of the node API only", name)
		}
	}

	key, err := os.ReadFile(f.NodeServingKey)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Prepare(cfg, zap.NewNop()); err != nil {
		t.Fatal(err)
	}
	if again := readCert(t, f.NodeServingCert); !again.Equal(node) {
		t.Fatal("node-api.crt was reissued although it names everything configured")
	}
	cfg.NodeAPI.TLSSANs = append(cfg.NodeAPI.TLSSANs, "sovra.example.org")
	if _, err := Prepare(cfg, zap.NewNop()); err != nil {
		t.Fatal(err)
	}
	if err := readCert(t, f.NodeServingCert).VerifyHostname("sovra.example.org"); err != nil {
		t.Fatalf("a new --node-tls-san did not reissue node-api.crt: %v", err)
	}
	if again, _ := os.ReadFile(f.NodeServingKey); !bytes.Equal(again, key) {
		t.Fatal("reissuing node-api.crt replaced its key")
	}
}

func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		t.Fatalf("%s: no PEM", path)
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
