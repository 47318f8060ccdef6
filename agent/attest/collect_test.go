package attest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sovra-dev/sovra/internal/claims"
)

func writeFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestCollect(t *testing.T) {
	dir := t.TempDir()
	layers := filepath.Join(dir, "layers")
	if err := os.Mkdir(layers, 0o700); err != nil {
		t.Fatal(err)
	}
	writeFile(t, layers, "000.gvisor.sqsh", "image")
	c := Collector{
		SecureBootPath: writeFile(t, dir, "sb", "\x06\x00\x00\x00\x00"),
		LockdownPath:   writeFile(t, dir, "lockdown", "[none] integrity confidentiality\n"),
		SELinuxPath:    writeFile(t, dir, "enforce", "0"),
		AppArmorPath:   writeFile(t, dir, "apparmor", "Y\n"),
		OSReleasePath:  writeFile(t, dir, "os-release", "NAME=\"Talos\"\nID=talos\nVERSION_ID=v1.13.0\n"),
		ExtensionsPath: writeFile(t, dir, "extensions.yaml", "layers:\n  - image: 000.gvisor.sqsh\n    metadata:\n      name: gvisor\n      version: 20250505.0\n  - image: 001.missing.sqsh\n    metadata:\n      name: missing\n      version: v1\n"),
		LayersDir:      layers,
	}
	s := c.Collect()
	want := map[string]string{
		claims.SecureBoot: "disabled", claims.Lockdown: "none", claims.SELinux: "permissive",
		claims.AppArmor: "enabled", claims.TalosVersion: "v1.13.0",
	}
	for name, v := range want {
		if got, ok := s.Value(name); !ok || got != v {
			t.Errorf("%s = %q (%v), want %q", name, got, s[name].Err, v)
		}
	}
	if got, _ := s.Value(claims.ExtensionPrefix + "gvisor"); !strings.HasPrefix(got, "20250505.0 sha256:") {
		t.Errorf("gvisor extension = %q", got)
	}
	if s[claims.ExtensionPrefix+"missing"].Err == "" {
		t.Error("an extension whose image cannot be read must be an error claim")
	}
	if _, err := s.Encode(); err != nil {
		t.Fatal(err)
	}
}

// TestCollectUnreadable: every claim that cannot be read becomes an error
// for that claim, and the report is still made.
func TestCollectUnreadable(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing")
	s := Collector{
		SecureBootPath: missing, LockdownPath: missing, SELinuxPath: dir, AppArmorPath: missing,
		OSReleasePath: writeFile(t, dir, "os-release", "ID=debian\nVERSION_ID=12\n"), ExtensionsPath: dir,
	}.Collect()
	for _, name := range []string{claims.SecureBoot, claims.Lockdown, claims.SELinux, claims.TalosVersion, claims.ExtensionPrefix + "*"} {
		if s[name].Err == "" {
			t.Errorf("%s = %+v, want an error claim", name, s[name])
		}
	}
	if v, _ := s.Value(claims.AppArmor); v != "disabled" {
		t.Errorf("absent AppArmor = %q, want disabled", v)
	}
	if _, err := s.Encode(); err != nil {
		t.Fatalf("a report with error claims must encode: %v", err)
	}
}
