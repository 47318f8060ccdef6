package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func TestParseFlagsWinOverEnvironment(t *testing.T) {
	c := New()
	err := c.Parse([]string{"--listen", "127.0.0.1:7000"}, env(map[string]string{
		"SOVRA_LISTEN":   "127.0.0.1:9999",
		"SOVRA_TLS_SAN":  "a.example,10.1.2.3",
		"SOVRA_DATA_DIR": "/srv/sovra",
	}))
	if err != nil {
		t.Fatal(err)
	}
	if c.Listen != "127.0.0.1:7000" || c.DataDir != "/srv/sovra" || strings.Join(c.TLSSANs, ",") != "a.example,10.1.2.3" {
		t.Fatalf("got %+v", c)
	}
}

func TestEnvName(t *testing.T) {
	if got := EnvName("oidc-issuer-url"); got != "SOVRA_OIDC_ISSUER_URL" {
		t.Fatal(got)
	}
}

func TestValidateReportsEverything(t *testing.T) {
	c := New()
	c.DataDir = filepath.Join(t.TempDir(), "data")
	c.Listen = "nope"
	c.Datastore = "postgres://user:topsecretpw@/db"
	c.OIDC.ClientID = "x"
	c.ShutdownTimeout = 0
	c.NodeAPI.RatePerIP = -1
	c.NodeAPI.MaxConns = -1
	c.BootstrapGrace = 0
	err := c.Validate()
	if err == nil {
		t.Fatal("no error")
	}
	for _, want := range []string{"--listen", "no host", "need --oidc-issuer-url", "--shutdown-timeout", "--node-rate-per-ip", "--node-max-conns -1", "--bootstrap-grace"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("missing %q in %v", want, err)
		}
	}
	if strings.Contains(err.Error(), "topsecretpw") {
		t.Fatal("the error holds the datastore password")
	}
}

func TestValidateDefaultsInFreshDir(t *testing.T) {
	c := New()
	c.DataDir = filepath.Join(t.TempDir(), "data")
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(c.DataDir); !os.IsNotExist(err) {
		t.Fatal("Validate created the data directory")
	}
	c.Datastore = "postgresql://sovra@db.internal:5432/sovra"
	if kind, err := c.DatastoreKind(); err != nil || kind != DatastorePostgres {
		t.Fatal(kind, err)
	}
}

func TestValidateSocketPathLength(t *testing.T) {
	c := New()
	c.DataDir = "/" + strings.Repeat("d", 120)
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "too long") {
		t.Fatalf("long data dir: %v", err)
	}
}

func TestValidateConnLimits(t *testing.T) {
	c := New()
	c.DataDir = filepath.Join(t.TempDir(), "data")
	if err := c.Parse(nil, env(map[string]string{"SOVRA_NODE_MAX_CONNS_PER_IP": "64", "SOVRA_NODE_MAX_CONNS": "100"})); err != nil {
		t.Fatal(err)
	}
	if c.NodeAPI.MaxConnsPerIP != 64 || c.NodeAPI.MaxConns != 100 {
		t.Fatalf("from the environment: %d, %d", c.NodeAPI.MaxConnsPerIP, c.NodeAPI.MaxConns)
	}
	c.NodeAPI.Listen = "" // the caps bound --kms-listen too
	c.NodeAPI.MaxConnsPerIP, c.NodeAPI.MaxConns = 200, 100
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "SOVRA_NODE_MAX_CONNS_PER_IP 200: must not exceed SOVRA_NODE_MAX_CONNS 100") {
		t.Fatalf("per-source cap above the total: %v", err)
	}
	c.NodeAPI.MaxConnsPerIP, c.NodeAPI.MaxConns = -1, 0
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "SOVRA_NODE_MAX_CONNS_PER_IP -1") {
		t.Fatalf("negative per-source cap: %v", err)
	}
	c.NodeAPI.MaxConnsPerIP, c.NodeAPI.MaxConns = 0, 0
	if err := c.Validate(); err != nil {
		t.Fatalf("no caps: %v", err)
	}
}

// TestErrorsNameTheirSource: a bad value that came from the environment is
// reported under its variable, one from the command line under its flag.
func TestErrorsNameTheirSource(t *testing.T) {
	c := New()
	err := c.Parse([]string{"--data-dir", filepath.Join(t.TempDir(), "data"), "--tls-san", "bad name!"}, env(map[string]string{
		"SOVRA_LISTEN":      "localhost:6443",
		"SOVRA_EK_ROOTS":    "",
		"SOVRA_NODE_LISTEN": "nowhere",
	}))
	if err != nil {
		t.Fatal(err)
	}
	err = c.Validate()
	if err == nil {
		t.Fatal("bad values passed")
	}
	for _, want := range []string{
		`SOVRA_LISTEN "localhost:6443": "localhost" is not an IP address`,
		`SOVRA_NODE_LISTEN "nowhere": want host:port`,
		`--tls-san "bad name!": neither an IP address nor a DNS name`,
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("errors lack %q:\n%v", want, err)
		}
	}
	for _, flag := range []string{"--listen", "--node-listen"} {
		if strings.Contains(err.Error(), flag+" ") {
			t.Errorf("errors name %s, which was not given:\n%v", flag, err)
		}
	}
	if c.Source("listen") != "SOVRA_LISTEN" || c.Source("tls-san") != "--tls-san" {
		t.Fatalf("sources: %s, %s", c.Source("listen"), c.Source("tls-san"))
	}
}

// TestValidateDataDirInProc: a data directory no one can create (in procfs,
// which access(2) calls writable for root) is a configuration error.
func TestValidateDataDirInProc(t *testing.T) {
	c := New()
	c.DataDir = "/proc/sovra-data"
	err := c.Validate()
	if err == nil || !strings.Contains(err.Error(), "--data-dir /proc/sovra-data: cannot be created") {
		t.Fatalf("data dir in /proc: %v", err)
	}
}

// TestMasterKeyCredential: under systemd, the keyring handed over by
// LoadCredential= is the master key file unless one is given; a missing
// credential leaves the KMS off.
func TestMasterKeyCredential(t *testing.T) {
	dir := t.TempDir()
	cred := filepath.Join(dir, MasterKeyCredential)
	if err := os.WriteFile(cred, []byte("x"), 0o400); err != nil {
		t.Fatal(err)
	}
	c := New()
	if err := c.Parse(nil, env(map[string]string{"CREDENTIALS_DIRECTORY": dir})); err != nil {
		t.Fatal(err)
	}
	if c.KMS.MasterKeyFile != cred || c.Source("master-key-file") != "credential master.keys" {
		t.Fatalf("credential: %q from %s", c.KMS.MasterKeyFile, c.Source("master-key-file"))
	}
	c = New()
	if err := c.Parse([]string{"--master-key-file", "/etc/other.keys"}, env(map[string]string{"CREDENTIALS_DIRECTORY": dir})); err != nil {
		t.Fatal(err)
	}
	if c.KMS.MasterKeyFile != "/etc/other.keys" || c.Source("master-key-file") != "--master-key-file" {
		t.Fatalf("flag: %q from %s", c.KMS.MasterKeyFile, c.Source("master-key-file"))
	}
	c = New()
	if err := c.Parse(nil, env(map[string]string{"CREDENTIALS_DIRECTORY": t.TempDir()})); err != nil {
		t.Fatal(err)
	}
	if c.KMS.MasterKeyFile != "" {
		t.Fatalf("no credential, yet %q", c.KMS.MasterKeyFile)
	}
}

// TestOIDCPrefixes: kube-apiserver's --oidc-username-prefix rule, and
// prefixes that would put every OIDC name under system: are refused.
func TestOIDCPrefixes(t *testing.T) {
	const issuer = "https://idp.example.org"
	for _, tc := range []struct{ claim, prefix, want string }{
		{"sub", "", issuer + "#"},
		{"email", "", ""},
		{"sub", "-", ""},
		{"email", "oidc:", "oidc:"},
		{"preferred_username", "corp:", "corp:"},
	} {
		o := OIDC{IssuerURL: issuer, UsernameClaim: tc.claim, UsernamePrefix: tc.prefix}
		if got := o.EffectiveUsernamePrefix(); got != tc.want {
			t.Errorf("claim %q, prefix %q: %q, want %q", tc.claim, tc.prefix, got, tc.want)
		}
	}

	c := New()
	c.DataDir = filepath.Join(t.TempDir(), "data")
	c.OIDC = OIDC{IssuerURL: issuer, ClientID: "sovra", UsernameClaim: "sub", UsernamePrefix: "system:", GroupsPrefix: "system:x-"}
	err := c.Validate()
	for _, want := range []string{`--oidc-username-prefix "system:": must not start with system:`, `--oidc-groups-prefix "system:x-"`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("want %q in %v", want, err)
		}
	}
}
