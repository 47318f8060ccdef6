package attest

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
)

// TestBinariesEnrollAndAttest is the story with the shipped binaries: sovrad
// trusts the swtpm manufacturer CA (--ek-roots), the agent binary talks to
// its node API over TLS with swtpm as the node's TPM, and `kubectl get
// sovranodes` shows the node enrolled and attested.
func TestBinariesEnrollAndAttest(t *testing.T) {
	lab := newSwtpmLab(t)
	_, eventLog := lab.use(t, 0)

	dir := filepath.Join(t.TempDir(), "data")
	nodePort := testutil.FreePort(t)
	d := sovradtest.Start(t, dir,
		"--node-listen", fmt.Sprintf("127.0.0.1:%d", nodePort),
		"--ek-roots", lab.Roots(),
		"--ek-intermediates", lab.Intermediates(),
		"--controllers", "none")

	uuid := newUUID()
	stateDir := t.TempDir()
	agentLog, err := os.Create(filepath.Join(t.TempDir(), "agent.log"))
	if err != nil {
		t.Fatal(err)
	}
	agent := exec.Command(testutil.Bin(t, "sovra-agent"), "run",
		"--daemon-endpoint", fmt.Sprintf("127.0.0.1:%d", nodePort),
		"--daemon-ca", filepath.Join(dir, "node-ca.crt"),
		"--tpm", "swtpm:"+lab.TPMs[0].Addr,
		"--event-log", eventLog,
		"--node-uuid", uuid,
		"--state-dir", stateDir)
	agent.Stdout, agent.Stderr = agentLog, agentLog
	if err := agent.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = agent.Process.Kill(); _ = agent.Wait() })

	deadline := time.Now().Add(90 * time.Second)
	var out string
	for time.Now().Before(deadline) {
		out, _ = d.TryKubectl("get", "sovranodes", "-o", "jsonpath={range .items[*]}{.spec.uuid} {.status.lastAttestationResult} {.status.conditions[?(@.type==\"Attested\")].status}{\"\\n\"}{end}")
		if strings.Contains(out, uuid+" Passed True") {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if !strings.Contains(out, uuid+" Passed True") {
		logs, _ := os.ReadFile(agentLog.Name())
		t.Fatalf("the node did not show as attested: %q\nagent log:\n%s\ndaemon log:\n%s", out, logs, d.Tail(30))
	}
	t.Logf("kubectl get sovranodes:\n%s", d.Kubectl("get", "sovranodes", "-o", "wide"))
	if logs, _ := os.ReadFile(agentLog.Name()); !strings.Contains(string(logs), "attest") {
		t.Fatalf("the agent logged no attestation line:\n%s", logs)
	}

	// The running agent's status document, as `talosctl read` would fetch
	// it, pretty-printed by `sovra-agent status`.
	var status string
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		b, _ := exec.Command(testutil.Bin(t, "sovra-agent"), "status", "--state-dir", stateDir).CombinedOutput()
		if status = string(b); strings.Contains(status, "Passed") {
			break
		}
	}
	for _, want := range []string{"Phase:", "Ready", "Attestation", "Enrolled:", "yes", "State:", "Passed", "Election", "Volumes"} {
		if !strings.Contains(status, want) {
			t.Errorf("sovra-agent status lacks %q:\n%s", want, status)
		}
	}
	t.Logf("sovra-agent status:\n%s", status)
}
