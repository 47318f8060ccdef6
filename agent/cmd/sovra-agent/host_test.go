package main

import (
	"crypto/x509"
	"path/filepath"
	"testing"

	"go.uber.org/zap"

	agentattest "github.com/sovra-dev/sovra/agent/attest"
	"github.com/sovra-dev/sovra/agent/config"
	"github.com/sovra-dev/sovra/agent/daemonconn"
	"github.com/sovra-dev/sovra/tests/talosfake"
)

func TestHostControllersOnlyInHostMode(t *testing.T) {
	pki, err := talosfake.NewPKI("test")
	if err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	if err := pki.Write(dir); err != nil {
		t.Fatal(err)
	}

	conn, err := daemonconn.New(daemonconn.Config{Endpoint: "127.0.0.1:7443", Roots: x509.NewCertPool()})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close() //nolint:errcheck

	base := config.Default()
	base.TalosConfigPath = filepath.Join(dir, talosfake.TalosconfigFile)
	agent := &agentattest.Agent{}

	for name, c := range map[string]struct {
		edit    func(*config.Config)
		agent   *agentattest.Agent
		want    int
		wantErr bool
	}{
		"host mode off":       {func(*config.Config) {}, agent, 0, false},
		"host mode":           {func(c *config.Config) { c.Host.Enabled = true }, agent, 1, false},
		"no attestation":      {func(c *config.Config) { c.Host.Enabled = true }, nil, 0, true},
		"talosconfig missing": {func(c *config.Config) { c.Host.Enabled, c.TalosConfigPath = true, filepath.Join(dir, "absent") }, agent, 0, true},
	} {
		t.Run(name, func(t *testing.T) {
			cfg := base
			c.edit(&cfg)

			var dc *daemonconn.Conn
			if c.agent != nil {
				dc = conn
			}

			ctrls, err := hostControllers(cfg, c.agent, dc, zap.NewNop())
			if (err != nil) != c.wantErr || len(ctrls) != c.want {
				t.Fatalf("%d controllers, error %v; want %d, an error: %v", len(ctrls), err, c.want, c.wantErr)
			}
		})
	}
}
