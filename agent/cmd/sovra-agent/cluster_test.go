package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/zap"

	agentattest "github.com/sovra-dev/sovra/agent/attest"
	"github.com/sovra-dev/sovra/agent/config"
)

func TestClusterLinkOnlyWhenTheBootstrapCanRun(t *testing.T) {
	dir := t.TempDir()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "node CA"},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	ca := filepath.Join(dir, "node-ca.crt")
	talosconfig := filepath.Join(dir, "talosconfig")
	for p, b := range map[string][]byte{ca: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), talosconfig: []byte("context: x\n")} {
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}

	base := config.Default()
	base.DaemonEndpoint, base.Attestation.DaemonCA, base.TalosConfigPath = "10.0.0.1:7443", ca, talosconfig
	base.NodeAddress = netip.MustParseAddr("10.0.0.5")
	agent := &agentattest.Agent{}

	for name, c := range map[string]struct {
		edit  func(*config.Config)
		agent *agentattest.Agent
		want  bool
	}{
		"daemon and address": {func(*config.Config) {}, agent, true},
		"edge-only":          {func(*config.Config) {}, nil, false},
		"worker":             {func(c *config.Config) { c.Role = config.RoleWorker }, agent, false},
		"no address":         {func(c *config.Config) { c.NodeAddress = netip.Addr{} }, agent, false},
		"no talosconfig":     {func(c *config.Config) { c.TalosConfigPath = filepath.Join(dir, "absent") }, agent, false},
		"enrollment host":    {func(c *config.Config) { c.Host.Enabled = true }, agent, false},
		"configured host":    {func(c *config.Config) { c.Host.Enabled, c.Host.Generation = true, 1 }, agent, true},
		"address from the CIDR": {func(c *config.Config) {
			c.NodeAddress, c.Bootstrap.NetworkCIDR = netip.Addr{}, netip.MustParsePrefix("127.0.0.0/8")
		}, agent, true},
	} {
		t.Run(name, func(t *testing.T) {
			cfg := base
			c.edit(&cfg)
			conn, err := daemonConn(cfg, cfg.DaemonEndpoint, agent.ClientCertificate)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			link := clusterLink(cfg, c.agent, conn, zap.NewNop())
			if (link != nil) != c.want {
				t.Fatalf("link = %v, want one: %v", link, c.want)
			}
			if link != nil && !link.Self.IsValid() {
				t.Fatal("link without this node's address")
			}
		})
	}
}
