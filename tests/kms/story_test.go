//go:build tpmsimulator

package kms

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"
	"go.uber.org/zap/zaptest"

	agentattest "github.com/sovra-dev/sovra/agent/attest"
	"github.com/sovra-dev/sovra/agent/tpm/simulator"
	"github.com/sovra-dev/sovra/agent/volumes"
	"github.com/sovra-dev/sovra/daemon/kms"
	"github.com/sovra-dev/sovra/internal/tcglog"
	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/sovradtest"
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
	nodeAddr := fmt.Sprintf("127.0.0.1:%d", sovradtest.FreePort(t))
	d := startKMS(t, "--node-listen", nodeAddr, "--ek-trust-on-first-use", "--attest-deadline", "20s")
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
	conn, err := agentattest.DialTLS(nodeAddr, &tls.Config{RootCAs: d.roots, MinVersion: tls.VersionTLS13})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	agent := &agentattest.Agent{
		TPM: sim, Client: agentattest.NewClient(conn), Claims: nodeRoot(t), EventLogPath: measureBoot(t, sim),
		Node:   agentattest.Node{UUID: uuid, Hostname: "worker-1", Addresses: []string{"127.0.0.1"}},
		Logger: zaptest.NewLogger(t),
	}
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
	// attestation; then the agent attests this boot within the deadline.
	if got := d.unsealEventually(ctx, n, blob); !bytes.Equal(got, secret) {
		t.Fatal("unsealed another key")
	}
	time.Sleep(1100 * time.Millisecond) // attestation times are to the second
	attestNow()
	deadline := time.Now().Add(converge)
	for {
		rec := d.getNode(ctx, n)
		if _, pending := rec.Annotations[kms.AnnotationReleasedAt]; !pending && !quarantinedRecord(rec) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the attestation after the Unseal did not meet the deadline: %v\n%s", rec.Annotations, d.Tail(20))
		}
		time.Sleep(200 * time.Millisecond)
	}

	// The agent's data volume, with the credential of this boot's attestation.
	remote := &volumes.Remote{Addr: d.KMSAddr, Roots: d.roots, Credential: agent.ClientCertificate}
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

// measureBoot plays the firmware on the simulator: it measures a boot into
// PCRs 0-7 and 11 and writes the matching event log.
func measureBoot(t *testing.T, tpm agentattest.TPM) string {
	t.Helper()
	log := tcglog.Firmware()
	rw, err := tpm.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer rw.Close()
	extend := func(pcr int, digest []byte) {
		if err := tpm2.PCRExtend(rw, tpmutil.Handle(pcr), tpm2.AlgSHA256, digest, ""); err != nil {
			t.Fatal(err)
		}
	}
	for _, e := range log.Events {
		extend(e.PCR, e.Digest[:])
	}
	uki := tcglog.Log{}
	ev := uki.Measure(11, tcglog.EVAction, []byte("talos uki v1.13.0"))
	extend(11, ev.Digest[:])
	p := filepath.Join(t.TempDir(), "binary_bios_measurements")
	if err := os.WriteFile(p, log.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// nodeRoot is a fake Talos root: the files the agent's claims come from.
func nodeRoot(t *testing.T) agentattest.Collector {
	t.Helper()
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	layer := write("layers/000.registry.example-sovra-agent-v0.1.0.sqsh", []byte("squashfs image"))
	return agentattest.Collector{
		SecureBootPath: write("efivars/SecureBoot", []byte{6, 0, 0, 0, 1}),
		LockdownPath:   write("security/lockdown", []byte("none [integrity] confidentiality\n")),
		SELinuxPath:    write("selinux/enforce", []byte("1")),
		AppArmorPath:   filepath.Join(dir, "absent"),
		OSReleasePath:  write("os-release", []byte("NAME=\"Talos\"\nID=talos\nVERSION_ID=v1.13.0\n")),
		ExtensionsPath: write("extensions.yaml", []byte("layers:\n  - image: "+filepath.Base(layer)+"\n    metadata:\n      name: sovra-agent\n      version: v0.1.0\n")),
		LayersDir:      filepath.Dir(layer),
	}
}
