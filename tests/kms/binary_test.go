package kms

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/sovradtest"
	"github.com/sovra-dev/sovra/tests/swtpmlab"
)

// TestAgentBinaryVolume is the agent-managed volume story with the shipped
// binaries and sovrad's defaults (the key service on the node API's port): the agent attests with swtpm, is released its volume's key over
// mutual TLS with the credential that attestation earned, formats the volume
// as LUKS2, and after a restart (a new boot of the agent) the key it is
// released again opens the same header. The key is never on disk.
func TestAgentBinaryVolume(t *testing.T) {
	testutil.Require(t, "cryptsetup")
	lab := swtpmlab.New(t, 1, "127.0.0.1")
	dir := filepath.Join(t.TempDir(), "data")
	keyDir := t.TempDir()
	nodePort := testutil.FreePort(t)
	d := sovradtest.Start(t, dir,
		"--node-listen", fmt.Sprintf("127.0.0.1:%d", nodePort),
		"--ek-roots", lab.Roots(), "--ek-intermediates", lab.Intermediates(),
		"--master-key-file", filepath.Join(keyDir, "master.key"),
		"--controllers", "none")

	volume := filepath.Join(t.TempDir(), "data.img")
	if err := os.WriteFile(volume, make([]byte, 32<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	uuid := "5d1c1e0a-9b7a-4f3e-8c2d-3a4b5c6d7e8f"

	run := func() string {
		t.Helper()
		stateDir := t.TempDir() // a new boot: no status document yet
		logFile := filepath.Join(t.TempDir(), "agent.log")
		f, err := os.Create(logFile)
		if err != nil {
			t.Fatal(err)
		}
		agent := exec.Command(testutil.Bin(t, "sovra-agent"), "run",
			"--daemon-endpoint", fmt.Sprintf("127.0.0.1:%d", nodePort),
			"--daemon-ca", filepath.Join(dir, "node-ca.crt"),
			"--tpm", "swtpm:"+lab.TPMs[0].Addr,
			"--event-log", lab.TPMs[0].EventLog,
			"--node-uuid", uuid,
			"--state-dir", stateDir,
			"--volumes", "data="+volume,
			"--volume-map-prefix=")
		agent.Stdout, agent.Stderr = f, f
		if err := agent.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = agent.Process.Kill(); _ = agent.Wait(); f.Close() }()
		var status string
		for deadline := time.Now().Add(90 * time.Second); time.Now().Before(deadline); time.Sleep(300 * time.Millisecond) {
			out, _ := exec.Command(testutil.Bin(t, "sovra-agent"), "status", "--state-dir", stateDir).CombinedOutput()
			if status = string(out); strings.Contains(status, "data") && strings.Contains(status, "Unlocked") {
				logs, _ := os.ReadFile(logFile)
				return string(logs)
			}
		}
		logs, _ := os.ReadFile(logFile)
		t.Fatalf("the volume was not unlocked:\n%s\nagent log:\n%s\ndaemon log:\n%s", status, logs, d.Tail(20))
		return ""
	}

	first := run()
	if out, err := exec.Command("cryptsetup", "isLuks", "--type", "luks2", volume).CombinedOutput(); err != nil {
		t.Fatalf("the agent did not format a LUKS2 volume: %v %s", err, out)
	}
	if !strings.Contains(first, "formatted") {
		t.Errorf("the first run did not log formatting the volume:\n%s", first)
	}
	second := run()
	if !strings.Contains(second, "verified") {
		t.Errorf("the second run did not log that the released key opens the volume:\n%s", second)
	}
	for _, logs := range []string{first, second} {
		if strings.Contains(strings.ToLower(logs), "passphrase=") {
			t.Fatal("the agent logged key material")
		}
	}
}
