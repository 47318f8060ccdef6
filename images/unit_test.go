package images

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sovra-dev/sovra/internal/testutil"
)

const (
	unitFile = "sovrad.service"
	// exposureThreshold fails `systemd-analyze security` above an exposure
	// of 2.0 (of 10): the unit must stay in systemd's "OK" band.
	exposureThreshold = "20"
)

// stageUnit copies the unit into a fresh directory with ExecStart pointing at
// an executable stand-in, since `systemd-analyze verify` checks that the
// binary exists; everything else is the shipped unit, byte for byte.
func stageUnit(t *testing.T) string {
	t.Helper()

	b, err := os.ReadFile(unitFile)
	if err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()

	stub := filepath.Join(dir, "sovrad")
	if err := os.WriteFile(stub, []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}

	unit := strings.ReplaceAll(string(b), "ExecStart="+DaemonBinary+" ", "ExecStart="+stub+" ")
	if unit == string(b) {
		t.Fatalf("%s does not start %s", unitFile, DaemonBinary)
	}

	path := filepath.Join(dir, unitFile)
	if err := os.WriteFile(path, []byte(unit), 0o644); err != nil {
		t.Fatal(err)
	}

	return path
}

func TestUnitVerifies(t *testing.T) {
	testutil.Require(t, "systemd-analyze")

	unit := stageUnit(t)

	out, err := exec.Command("systemd-analyze", "verify", unit).CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}

	out, err = exec.Command("systemd-analyze", "security", "--offline=yes", "--threshold="+exposureThreshold, unit).CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze security: exposure above 2.0: %v\n%s", err, out)
	}

	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	t.Log(lines[len(lines)-1])
}

func TestUnitSettings(t *testing.T) {
	b, err := os.ReadFile(unitFile)
	if err != nil {
		t.Fatal(err)
	}

	unit := string(b)

	for _, want := range []string{
		"StateDirectory=sovra\n",
		"StateDirectoryMode=0700\n",
		"EnvironmentFile=-/etc/sovra/sovrad.env\n",
		"Restart=always\n",
		"DynamicUser=yes\n",
		"NoNewPrivileges=yes\n",
		"ProtectSystem=strict\n",
		"ExecStart=" + DaemonBinary + " --data-dir=%S/sovra\n",
		"Type=notify\n",
		"NotifyAccess=main\n",
		// The dynamic user reads the master keyring as a credential.
		"LoadCredential=master.keys:/etc/sovra/master.keys\n",
	} {
		if !strings.Contains(unit, want) {
			t.Errorf("%s lacks %q", unitFile, strings.TrimSpace(want))
		}
	}
}
