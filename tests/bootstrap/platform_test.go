package bootstrap

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/agent/status"
	"github.com/sovra-dev/sovra/internal/testutil"
)

const (
	// msgUnavailable is the agent's one warning at start on a machine
	// that cannot attest (agent/cmd/sovra-agent).
	msgUnavailable = "attestation unavailable on this machine"
	// statusTimeout bounds the wait for the status document to show the
	// end of the bootstrap path.
	statusTimeout = 10 * time.Second
)

// withoutTPMOrUEFI runs the agent as on a plain VM booted in legacy BIOS
// mode, whatever the test machine has: in a mount namespace of its own, /dev
// holds no TPM device and /sys/firmware no efi/ (ip netns exec has already
// given it a sysfs of its own).
var withoutTPMOrUEFI = []string{
	"unshare", "--mount", "--propagation", "private", "sh", "-ec",
	`mount -t tmpfs -o mode=0755 sovra-no-tpm /dev
mount -t tmpfs -o ro sovra-no-uefi /sys/firmware
exec "$@"`,
	"sovra-agent",
}

// TestEdgeOnlyWithoutTPMOrUEFI: three control planes on machines without a
// TPM or UEFI, in edge-only mode (the coordinator-free bootstrap of
// KOMMODITY_AUTOBOOTSTRAP_*), discover each other, elect one leader and
// bootstrap etcd once. Each agent says at start, in one warning, that
// attestation is unavailable and why, and its status document, and
// `sovra-agent status`, say the same.
func TestEdgeOnlyWithoutTPMOrUEFI(t *testing.T) {
	testutil.Require(t, "unshare", "sh")

	const n = 3

	c := newCluster(t)
	agent := testutil.Bin(t, "sovra-agent")
	hosts := make([]*host, n)

	for i := range n {
		hosts[i] = c.addHost()
		hosts[i].startFake(fakeOptions{bootTime: baseBoot + int64(i)})
		hosts[i].startAgentArgv(hosts[i].agentEnv(n), append(withoutTPMOrUEFI, agent, "run")...)
	}

	c.waitFinal(hosts...)
	checkOneBootstrap(t, c, hosts[0])

	for _, h := range hosts {
		log := readFile(h.agentLog())
		if got := strings.Count(log, `"msg":"`+msgUnavailable+`"`); got != 1 {
			t.Errorf("%s: %d warnings that attestation is unavailable, want 1\n%s", h.addr, got, tail(log, 20))
		}

		for _, line := range strings.Split(log, "\n") {
			if strings.Contains(line, msgUnavailable) &&
				(!strings.Contains(line, `"level":"warn"`) || !strings.Contains(line, "no TPM device") ||
					!strings.Contains(line, "no UEFI variables") || !strings.Contains(line, "edge-only mode")) {
				t.Errorf("%s: the warning does not say why and what runs: %s", h.addr, line)
			}
		}

		doc := waitStatus(t, h, func(d status.Document) bool { return d.Election.Bootstrapped })
		a := doc.Attestation

		if a.State != status.AttestationUnavailable || !strings.Contains(a.Reason, "no TPM device") ||
			!strings.Contains(a.Reason, "no UEFI variables") || a.Enrolled {
			t.Errorf("%s: status attestation %+v, want Unavailable with the reasons", h.addr, a)
		}

		if doc.Phase != status.PhaseReady {
			t.Errorf("%s: phase %s (%s), want Ready: edge-only mode needs no attestation", h.addr, doc.Phase, doc.Message)
		}

		ctx, cancel := context.WithTimeout(context.Background(), statusTimeout)
		out, stderr, err := runIn(ctx, h.ns, nil, agent, "status", "--state-dir", h.stateDir())

		cancel()

		if err != nil {
			t.Fatalf("sovra-agent status: %v\n%s", err, stderr)
		}

		for _, want := range []string{"State:", "Unavailable", "Reason:", "no TPM device", "no UEFI variables", "Bootstrapped:"} {
			if !strings.Contains(string(out), want) {
				t.Errorf("%s: sovra-agent status lacks %q:\n%s", h.addr, want, out)
			}
		}

		if h == hosts[0] {
			t.Logf("sovra-agent status on %s:\n%s", h.addr, out)
		}
	}

	// With a daemon, the same machine cannot attest: the agent says so,
	// keeps running, and never calls the daemon (nothing listens there).
	d := c.addHost()
	d.startFake(fakeOptions{bootTime: baseBoot + n})

	ca := filepath.Join(d.dir, "node-ca.crt")
	if err := os.WriteFile(ca, []byte("never read: the agent does not connect without attestation\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	d.startAgentArgv(d.agentEnv(n, "SOVRA_DAEMON_ENDPOINT="+netPrefix+".1:7443", "SOVRA_DAEMON_CA="+ca), append(withoutTPMOrUEFI, agent, "run")...)

	doc := waitStatus(t, d, func(d status.Document) bool {
		return d.Attestation.State == status.AttestationUnavailable && d.Phase == status.PhaseDegraded
	})
	if !strings.Contains(doc.Message, "attestation unavailable: no TPM device") {
		t.Errorf("daemon mode: status message %q", doc.Message)
	}

	log := readFile(d.agentLog())
	if strings.Count(log, `"msg":"`+msgUnavailable+`"`) != 1 || !strings.Contains(log, "cannot enroll or attest") || d.logHas("attestation on") {
		t.Errorf("daemon mode: the log does not say plainly that this node cannot attest:\n%s", tail(log, 20))
	}

	select {
	case <-d.agentDone:
		t.Fatalf("daemon mode: the agent exited (%v)\n%s", d.agentErr, tail(log, 20))
	default:
	}
}

// waitStatus waits until the host's status document satisfies ok.
func waitStatus(t *testing.T, h *host, ok func(status.Document) bool) status.Document {
	t.Helper()

	var (
		doc status.Document
		err error
	)

	for deadline := time.Now().Add(statusTimeout); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if doc, err = status.Read(status.Path(h.stateDir())); err == nil && ok(doc) {
			return doc
		}
	}

	if _, serr := os.Stat(status.Path(h.stateDir())); serr != nil {
		t.Fatalf("%s: no status document: %v", h.addr, serr)
	}

	t.Fatalf("%s: status document never matched (%v): %+v", h.addr, err, doc)

	return doc
}
