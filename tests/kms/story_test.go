//go:build tpmsimulator

package kms

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	agentattest "github.com/sovra-dev/sovra/agent/attest"
	"github.com/sovra-dev/sovra/agent/tpm/simulator"
	"github.com/sovra-dev/sovra/agent/volumes"
	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/swtpmlab"
)

// TestStoryAttestedNode is the whole path with no stand-in on the node
// side: a node with a TPM (the reference simulator) enrolls and attests
// with the agent's code against sovrad's node API; Talos's KMS client then
// seals and, on the next boot, unseals against sovrad, judged on the record
// that attestation wrote; the agent attests this boot, fetches its data
// volume's key with the node credential it earned, and formats the volume
// with it. Revocation with kubectl delete ends both.
func TestStoryAttestedNode(t *testing.T) {
	testutil.Require(t, "cryptsetup")
	nodeAddr := fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t))
	d := startKMS(t, "--ek-trust-on-first-use", "--attest-deadline", "20s")
	nodeAddr = d.KMSAddr
	ctx := context.Background()

	for deadline := time.Now().Add(converge); ; { // the node API starts once the API is ready
		c, err := net.Dial("tcp", nodeAddr)
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the node API does not listen: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	sim, err := simulator.New(1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sim.Close() })
	uuid := newNode(t).UUID
	root := swtpmlab.NodeRoot(t)
	agent := &agentattest.Agent{
		TPM: sim, Claims: root, EventLogPath: swtpmlab.Boot(t, sim, t.TempDir()),
		Node:   agentattest.Node{UUID: uuid, Hostname: "worker-1", Addresses: []string{"127.0.0.1"}},
		Logger: zaptest.NewLogger(t),
	}
	agent.Client = agentattest.NewClient(agentConn(t, nodeAddr, d.roots, agent.ClientCertificate))
	attestNow := func() {
		t.Helper()
		if err := agent.Enroll(ctx); err != nil {
			t.Fatalf("enrolling: %v\n%s", err, d.Tail(20))
		}
		if _, err := agent.Attest(ctx); err != nil {
			t.Fatalf("attesting: %v\n%s", err, d.Tail(20))
		}
	}

	// Boot 1: the node enrolls and attests; Talos seals STATE.
	attestNow()
	n := node{Name: agent.NodeName(), UUID: uuid}
	secret := key(t)
	blob := d.sealEventually(ctx, n, secret)

	// Boot 2: Talos unseals before any extension runs, judged on boot 1's
	// attestation; then the agent attests this boot. The release is
	// explained (here by the Seal moments before; on a real node, days
	// later, by the boot the agent reports), never unexpected.
	swtpmlab.Reboot(t, root)
	if got := d.unsealEventually(ctx, n, blob); !bytes.Equal(got, secret) {
		t.Fatal("unsealed another key")
	}
	attestNow()
	boot := d.getNode(ctx, n).CurrentBoot()
	if boot == nil || boot.ID == "" {
		t.Fatal("the attestation recorded no boot")
	}
	e := d.waitLedger(ctx, n, "127.0.0.1", v1alpha1.VerdictExplained)
	t.Logf("the release is explained by %s", e.Boot)

	// The agent's data volume, with the credential of this boot's attestation.
	remote := &volumes.Remote{Conn: agentConn(t, d.KMSAddr, d.roots, agent.ClientCertificate)}
	vol := volumes.Volume{ID: "data", Device: newVolume(t)}
	m := &volumes.Manager{Keys: remote, Logger: zaptest.NewLogger(t)}
	if outcome, _, err := m.Prepare(ctx, vol, ""); err != nil || outcome != volumes.Formatted {
		t.Fatalf("formatting the data volume: %s, %v\n%s", outcome, err, d.Tail(20))
	}
	released, _, err := remote.VolumeKey(ctx, vol.ID, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := testPassphrase(t, vol.Device, released); err != nil {
		t.Fatalf("the released key does not open the volume: %v", err)
	}
	t.Logf("kubectl get sovranodes:\n%s", d.Kubectl("get", "sovranodes", "-o", "wide"))

	// Revoked with one kubectl delete: no Unseal, no volume key.
	d.Kubectl("delete", "sovranode", n.Name)
	d.deniedEventually(ctx, n, blob)
	if _, _, err := remote.VolumeKey(ctx, vol.ID, 1); err == nil {
		t.Fatal("a revoked node got its volume key")
	}
}
