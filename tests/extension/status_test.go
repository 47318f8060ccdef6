package extension_test

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/agent/status"
	"github.com/sovra-dev/sovra/internal/testutil"
)

// TestAgentStatusCommand runs the built agent's `status` subcommand on a
// status document written the way a running agent writes it (a Recorder in
// its state directory), both from the directory and piped in as it comes out
// of `talosctl read`.
func TestAgentStatusCommand(t *testing.T) {
	agent := testutil.Bin(t, "sovra-agent")
	dir := t.TempDir()

	now := time.Now().UTC()
	r := status.NewRecorder(dir, "v0.1.0", "cp-2", func() time.Time { return now })

	if err := r.Update(func(d *status.Document) {
		d.Phase = status.PhaseBootstrapping
		d.Message = "elected; bootstrapping etcd"
		d.Attestation = status.Attestation{Enrolled: true, State: status.AttestationPassed, LastSuccess: now}
		d.Election = status.Election{Role: status.RoleLeader, Leader: "10.0.0.12", Candidates: []string{"10.0.0.11", "10.0.0.12", "10.0.0.13"}, Expected: 3, Quorum: 2}
		d.Volumes = []status.Volume{{Name: "data", Device: "/dev/sdb1", State: status.VolumeUnlocked}}
	}); err != nil {
		t.Fatal(err)
	}

	out, err := exec.Command(agent, "status", "--state-dir", dir).CombinedOutput()
	if err != nil {
		var exit *exec.ExitError
		if errors.As(err, &exit) && strings.Contains(string(out), "unknown command") {
			if testutil.InCI() {
				t.Fatalf("%s has no status subcommand: add status.Command to agent/cmd/sovra-agent", agent)
			}

			t.Skipf("%s has no status subcommand yet (agent/cmd/sovra-agent must list status.Command)", agent)
		}

		t.Fatalf("sovra-agent status: %v\n%s", err, out)
	}

	t.Logf("sovra-agent status:\n%s", out)

	for _, want := range []string{
		"Phase:", "Bootstrapping (elected; bootstrapping etcd)",
		"Attestation", "Enrolled:", "yes", "State:", "Passed",
		"Election", "Role:", "Leader", "10.0.0.12",
		"Volumes", "data:", "Unlocked on /dev/sdb1",
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("output lacks %q", want)
		}
	}

	b, err := os.ReadFile(status.Path(dir))
	if err != nil {
		t.Fatal(err)
	}

	cmd := exec.Command(agent, "status", "--file", "-")
	cmd.Stdin = bytes.NewReader(b)

	piped, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("sovra-agent status --file -: %v\n%s", err, piped)
	}

	// The ages may have ticked between the two runs; the facts may not.
	if !strings.Contains(string(piped), "Bootstrapping (elected; bootstrapping etcd)") ||
		!strings.Contains(string(piped), "Unlocked on /dev/sdb1") {
		t.Errorf("piped output differs:\n%s", piped)
	}
}
