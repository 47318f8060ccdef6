package config_test

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/agent/config"
)

func env(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) {
		v, ok := m[k]

		return v, ok
	}
}

func talosconfig(t *testing.T) string {
	t.Helper()

	p := filepath.Join(t.TempDir(), "talosconfig")
	if err := os.WriteFile(p, []byte("context: x\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	return p
}

func TestDefaults(t *testing.T) {
	cfg, err := config.Load(nil, env(nil))
	if err != nil {
		t.Fatalf("load: %v", err)
	}

	if cfg.Bootstrap.Enabled() {
		t.Fatal("bootstrap enabled without a network CIDR")
	}

	if cfg.Bootstrap.ExpectedControlPlanes != 3 {
		t.Fatalf("expected control planes = %d, want 3", cfg.Bootstrap.ExpectedControlPlanes)
	}

	if cfg.Role != config.RoleAuto || cfg.TalosAPIPort != 50000 {
		t.Fatalf("unexpected defaults %+v", cfg)
	}
}

func TestKommodityVariables(t *testing.T) {
	cfg, err := config.Load(nil, env(map[string]string{
		"KOMMODITY_AUTOBOOTSTRAP_NETWORK_CIDR": "10.0.0.7/24",
		"KOMMODITY_AUTOBOOTSTRAP_QUORUM":       "5",
		"SOVRA_TALOSCONFIG":                    talosconfig(t),
	}))
	if err != nil {
		t.Fatalf("load: %v", err)
	}

	if cfg.Bootstrap.NetworkCIDR != netip.MustParsePrefix("10.0.0.0/24") {
		t.Fatalf("cidr = %s", cfg.Bootstrap.NetworkCIDR)
	}

	if cfg.Bootstrap.ExpectedControlPlanes != 5 {
		t.Fatalf("expected = %d", cfg.Bootstrap.ExpectedControlPlanes)
	}
}

func TestFlagWinsOverEnv(t *testing.T) {
	cfg, err := config.Load([]string{"--scan-interval", "2s"}, env(map[string]string{"SOVRA_BOOTSTRAP_SCAN_INTERVAL": "9s"}))
	if err != nil {
		t.Fatalf("load: %v", err)
	}

	if cfg.Bootstrap.ScanInterval != 2*time.Second {
		t.Fatalf("scan interval = %s", cfg.Bootstrap.ScanInterval)
	}
}

func TestCIDRPolicy(t *testing.T) {
	tc := talosconfig(t)

	for _, c := range []struct {
		cidr, allow string
		wantErr     string
	}{
		{cidr: "10.1.0.0/16"},
		{cidr: "192.168.7.0/24"},
		{cidr: "fd00:1::/112"},
		{cidr: "8.8.8.0/24", wantErr: "not a private range"},
		{cidr: "0.0.0.0/0", wantErr: "not a private range"},
		{cidr: "10.0.0.0/8", wantErr: "larger than 65536"},
		{cidr: "172.16.0.0/15", wantErr: "larger than 65536"},
		{cidr: "8.8.8.0/24", allow: "true"},
		{cidr: "10.0.0.0/8", allow: "true"},
	} {
		t.Run(c.cidr+"/"+c.allow, func(t *testing.T) {
			_, err := config.Load(nil, env(map[string]string{
				"SOVRA_BOOTSTRAP_NETWORK_CIDR":      c.cidr,
				"SOVRA_BOOTSTRAP_ALLOW_UNSAFE_CIDR": c.allow,
				"SOVRA_TALOSCONFIG":                 tc,
			}))

			switch {
			case c.wantErr == "" && err != nil:
				t.Fatalf("unexpected error: %v", err)
			case c.wantErr != "" && (err == nil || !strings.Contains(err.Error(), c.wantErr)):
				t.Fatalf("error = %v, want %q", err, c.wantErr)
			}
		})
	}
}

func TestEveryProblemAtOnce(t *testing.T) {
	_, err := config.Load(nil, env(map[string]string{
		"SOVRA_ROLE":                              "boss",
		"SOVRA_LOG_LEVEL":                         "loud",
		"SOVRA_BOOTSTRAP_NETWORK_CIDR":            "8.0.0.0/8",
		"SOVRA_BOOTSTRAP_EXPECTED_CONTROL_PLANES": "0",
		"SOVRA_TALOSCONFIG":                       "/nonexistent/talosconfig",
		"SOVRA_NODE_ADDRESS":                      "192.168.1.1",
	}))
	if err == nil {
		t.Fatal("no error")
	}

	for _, want := range []string{"role", "log level", "not a private range", "larger than", "expected control planes", "talosconfig", "node address"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %q:\n%v", want, err)
		}
	}
}

func TestConflictingAliases(t *testing.T) {
	_, err := config.Load(nil, env(map[string]string{
		"SOVRA_BOOTSTRAP_EXPECTED_CONTROL_PLANES": "3",
		"KOMMODITY_AUTOBOOTSTRAP_QUORUM":          "1",
	}))
	if err == nil || !strings.Contains(err.Error(), "both set") {
		t.Fatalf("error = %v, want a conflict", err)
	}
}

func TestHostMode(t *testing.T) {
	tc := talosconfig(t)
	ca := filepath.Join(t.TempDir(), "node-ca.crt")

	cfg, err := config.Load([]string{"--host-generation", "3"}, env(map[string]string{
		"SOVRA_HOST": "true", "SOVRA_DAEMON_ENDPOINT": "10.0.0.1:7443", "SOVRA_DAEMON_CA": ca, "SOVRA_TALOSCONFIG": tc,
	}))
	if err != nil {
		t.Fatalf("load: %v", err)
	}

	if !cfg.Host.Enabled || cfg.Host.Generation != 3 {
		t.Fatalf("host = %+v, want enabled, generation 3", cfg.Host)
	}

	for name, c := range map[string]struct {
		env  map[string]string
		want []string
	}{
		"no daemon, no talosconfig": {
			map[string]string{"SOVRA_HOST": "true", "SOVRA_TALOSCONFIG": filepath.Join(t.TempDir(), "absent")},
			[]string{"host mode needs the daemon endpoint", "host mode: talosconfig"},
		},
		"generation without host mode": {
			map[string]string{"SOVRA_HOST_GENERATION": "2"},
			[]string{"host generation set without host mode"},
		},
		"negative generation": {
			map[string]string{"SOVRA_HOST": "true", "SOVRA_HOST_GENERATION": "-1", "SOVRA_DAEMON_ENDPOINT": "10.0.0.1:7443", "SOVRA_DAEMON_CA": ca, "SOVRA_TALOSCONFIG": tc},
			[]string{"host generation -1"},
		},
		"not a bool": {
			map[string]string{"SOVRA_HOST": "maybe"},
			[]string{"SOVRA_HOST: invalid value"},
		},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := config.Load(nil, env(c.env))
			if err == nil {
				t.Fatal("loaded an invalid host mode")
			}

			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
		})
	}
}
