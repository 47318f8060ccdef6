package kms

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/custody"
	"github.com/sovra-dev/sovra/daemon/kms"
	"github.com/sovra-dev/sovra/internal/testutil"
)

// TestWireCompatibility: the upstream kms-client, called exactly as Talos
// calls it, seals and unseals against the real sovrad over TLS.
func TestWireCompatibility(t *testing.T) {
	d := startKMS(t)
	ctx := context.Background()
	n := newNode(t)
	if err := d.createNode(ctx, n, attestedNode); err != nil {
		t.Fatal(err)
	}
	secret := key(t)
	blob := d.sealEventually(ctx, n, secret)
	if len(blob) != len(secret)+1+4+12+16 {
		t.Fatalf("blob of %d bytes", len(blob))
	}
	got, err := d.Unseal(ctx, n.UUID, blob)
	if err != nil {
		t.Fatalf("Unseal: %v\n%s", err, d.Tail(20))
	}
	if !bytes.Equal(got, secret) {
		t.Fatal("Unseal returned other data")
	}
	// Talos may send the UUID in either case.
	if got, err := d.Unseal(ctx, strings.ToUpper(n.UUID), blob); err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("Unseal with an upper-case UUID: %v", err)
	}
	// The record holds the salt and no key; the decisions are audited: the
	// Seal in an event, the release in the ledger (explained by the Seal
	// just before it: Talos opens what it formatted).
	rec := d.getNode(ctx, n)
	if len(rec.Status.KeySalt) != 32 {
		t.Fatalf("salt of %d bytes in the record", len(rec.Status.KeySalt))
	}
	waitEvent(t, d, n.Name, "KMSSealAllowed")
	if e := d.waitLedger(ctx, n, "127.0.0.1", v1alpha1.VerdictExplained); e.Count != 2 || !strings.HasPrefix(e.Boot, "sealed at") {
		t.Fatalf("ledger entry %+v: want both calls in one entry, explained by the Seal", e)
	}
	log, _ := os.ReadFile(d.Log)
	if enc, ok := findSecret(log, secret); ok {
		t.Fatalf("the daemon log holds the key (%s)", enc)
	}
	if !bytes.Contains(log, []byte(`"reason":"Released"`)) {
		t.Fatalf("no audit log line for the release:\n%s", d.Tail(20))
	}
}

// waitEvent waits for an event with reason on the record name.
func waitEvent(t *testing.T, d *kmsDaemon, name, reason string) string {
	t.Helper()
	deadline := time.Now().Add(converge)
	for {
		out := d.Kubectl("get", "events", "-n", "default", "--field-selector", "involvedObject.name="+name,
			"-o", "custom-columns=REASON:.reason,MESSAGE:.message", "--no-headers")
		for _, line := range strings.Split(out, "\n") {
			if strings.HasPrefix(line, reason+" ") {
				return line
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s event on %s:\n%s", reason, name, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestAttacks: each is denied with the uniform PermissionDenied and no data,
// and its reason reaches the audit trail.
func TestAttacks(t *testing.T) {
	// Every call comes from 127.0.0.1: the per-source limit, which
	// TestUUIDFlood covers, would refuse the suite's own calls.
	d := startKMS(t, "--kms-bind-addresses", "--kms-trusted-proxies", "127.0.0.2/32", "--attest-deadline", "3s", "--kms-rate-per-ip", "1000")
	ctx := context.Background()
	a, b := newNode(t), newNode(t)
	for _, n := range []node{a, b} {
		if err := d.createNode(ctx, n, attestedNode); err != nil {
			t.Fatal(err)
		}
	}
	secretA := key(t)
	blobA := d.sealEventually(ctx, a, secretA)
	blobB := d.sealEventually(ctx, b, key(t))
	d.unsealEventually(ctx, a, blobA)
	d.unsealEventually(ctx, b, blobB)

	deny := func(t *testing.T, uuid string, blob []byte, reason, record string) {
		t.Helper()
		data, err := d.Unseal(ctx, uuid, blob)
		requireDenied(t, data, err)
		if record != "" {
			waitEvent(t, d, record, "KMSUnsealDenied")
		}
		waitLog(t, d, reason)
	}

	t.Run("blob of node A unsealed as node B", func(t *testing.T) {
		deny(t, b.UUID, blobA, "BlobRejected", b.Name)
	})
	t.Run("unknown UUID", func(t *testing.T) {
		deny(t, newNode(t).UUID, blobA, "UnknownNode", "")
	})
	t.Run("tampered blob", func(t *testing.T) {
		for _, i := range []int{0, 3, 8, len(blobA) - 20, len(blobA) - 1} {
			tampered := bytes.Clone(blobA)
			tampered[i] ^= 0x40
			data, err := d.Unseal(ctx, a.UUID, tampered)
			requireDenied(t, data, err)
		}
		waitLog(t, d, "BlobRejected")
		waitLog(t, d, "BlobMalformed")
		waitLog(t, d, "BlobUnknownKeyVersion")
	})
	t.Run("truncated blob", func(t *testing.T) {
		for _, n := range []int{0, 1, 5, 17, 33, len(blobB) - 1} {
			data, err := d.Unseal(ctx, b.UUID, blobB[:n])
			requireDenied(t, data, err)
		}
		waitLog(t, d, "BlobMalformed")
	})
	t.Run("node whose last attestation failed", func(t *testing.T) {
		c := newNode(t)
		if err := d.createNode(ctx, c, attestedNode); err != nil {
			t.Fatal(err)
		}
		blob := d.sealEventually(ctx, c, key(t))
		d.setNodeState(ctx, c, nodeState{Enrolled: true, Attested: false, Result: v1alpha1.ResultFailed, Addresses: attestedNode.Addresses})
		d.deniedEventually(ctx, c, blob)
		waitLog(t, d, "LastAttestationNotPassed")
		// Enrolled but never attested: denied too.
		e := newNode(t)
		if err := d.createNode(ctx, e, nodeState{Enrolled: true, Addresses: attestedNode.Addresses}); err != nil {
			t.Fatal(err)
		}
		eblob := d.sealEventually(ctx, e, key(t)) // pre-registered nodes may Seal
		d.deniedEventually(ctx, e, eblob)
	})
	t.Run("forged forwarding header from an untrusted source", func(t *testing.T) {
		far := newNode(t)
		st := attestedNode
		st.Addresses = []string{"10.9.8.7"}
		if err := d.createNode(ctx, far, st); err != nil {
			t.Fatal(err)
		}
		// Seal through the trusted proxy (127.0.0.2) on behalf of 10.9.8.7.
		proxy := *d
		proxy.localAddr = "127.0.0.2"
		var blob []byte
		deadline := time.Now().Add(converge)
		for {
			var err error
			if blob, err = proxy.Seal(forwarded(ctx, "10.9.8.7"), far.UUID, key(t)); err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("Seal through the trusted proxy: %v", err)
			}
			time.Sleep(50 * time.Millisecond)
		}
		// The same header from 127.0.0.1, not a trusted proxy, is ignored.
		data, err := d.Unseal(forwarded(ctx, "10.9.8.7"), far.UUID, blob)
		requireDenied(t, data, err)
		waitLog(t, d, "AddressMismatch")
		waitLog(t, d, "forwarding header ignored")
		// A client cannot prepend its way past the proxy either: the proxy
		// appends the real client, which is read from the right.
		data, err = proxy.Unseal(forwarded(ctx, "10.9.8.7, 127.0.0.1"), far.UUID, blob)
		requireDenied(t, data, err)
		// Through the proxy, the genuine node is served.
		if _, err := proxy.Unseal(forwarded(ctx, "10.9.8.7"), far.UUID, blob); err != nil {
			t.Fatalf("Unseal through the trusted proxy: %v", err)
		}
	})
	t.Run("oversized request", func(t *testing.T) {
		// Past the transport limit of the node API's port (which also
		// carries attestations and their event logs): refused before it is read.
		data, err := d.Unseal(ctx, a.UUID, make([]byte, 3<<20))
		if data != nil || codeOf(err) != codes.ResourceExhausted {
			t.Fatalf("3 MiB request: %v", err)
		}
		data, err = d.Unseal(ctx, a.UUID, make([]byte, 1<<20))
		requireDenied(t, data, err)
		// Under the transport limit but over the largest blob.
		data, err = d.Unseal(ctx, a.UUID, make([]byte, 2048))
		requireDenied(t, data, err)
		data, err = d.Unseal(ctx, strings.Repeat("a", 200), blobA)
		requireDenied(t, data, err)
		_, err = d.Seal(ctx, a.UUID, make([]byte, 1024))
		requireDenied(t, nil, err)
		waitLog(t, d, "InvalidRequest")
	})
	t.Run("revoked node, re-created with the same UUID", func(t *testing.T) {
		r := newNode(t)
		if err := d.createNode(ctx, r, attestedNode); err != nil {
			t.Fatal(err)
		}
		secret := key(t)
		blob := d.sealEventually(ctx, r, secret)
		d.unsealEventually(ctx, r, blob)
		d.Kubectl("delete", "sovranode", r.Name)
		d.deniedEventually(ctx, r, blob)
		waitLog(t, d, "UnknownNode")
		// Re-created (same name, same UUID, attested): a new record, no salt.
		if err := d.createNode(ctx, r, attestedNode); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second)
		data, err := d.Unseal(ctx, r.UUID, blob)
		requireDenied(t, data, err)
		// Even after the node seals again (a new salt), the old blob is dead.
		newBlob := d.sealEventually(ctx, r, key(t))
		d.unsealEventually(ctx, r, newBlob)
		data, err = d.Unseal(ctx, r.UUID, blob)
		requireDenied(t, data, err)
	})
	t.Run("a boot that unsealed and then failed attestation", func(t *testing.T) {
		f := newNode(t)
		if err := d.createNode(ctx, f, attestedNode); err != nil {
			t.Fatal(err)
		}
		blob := d.sealEventually(ctx, f, key(t))
		// A later boot: Talos unseals, then the node attests this boot, and
		// fails (the TPM's word): quarantined.
		d.unsealEventually(ctx, f, blob)
		d.setNodeState(ctx, f, nodeState{Enrolled: true, Attested: false, Result: v1alpha1.ResultFailed,
			Addresses: attestedNode.Addresses, Boot: "boot-f2", BootStarted: time.Now().Add(-time.Minute)})
		d.waitCondition(ctx, f, kms.ConditionQuarantined, true)
		waitLog(t, d, kms.ReasonFailedAfterUnseal)
		waitEvent(t, d, f.Name, "Quarantined")
		// A passing attestation alone does not lift it; an operator does.
		d.setNodeState(ctx, f, nodeState{Enrolled: true, Attested: true, Result: v1alpha1.ResultPassed,
			Addresses: attestedNode.Addresses, Boot: "boot-f3"})
		time.Sleep(2 * kms.SweepInterval)
		data, err := d.Unseal(ctx, f.UUID, blob)
		requireDenied(t, data, err)
		waitLog(t, d, `"reason":"Quarantined"`)
		d.Kubectl("annotate", "sovranode", f.Name, kms.AnnotationClearQuarantine+"=yes")
		d.unsealEventually(ctx, f, blob)
		waitEvent(t, d, f.Name, "QuarantineCleared")
	})
	t.Run("seal for an unknown node outside lab mode", func(t *testing.T) {
		_, err := d.Seal(ctx, newNode(t).UUID, key(t))
		requireDenied(t, nil, err)
	})

	log, _ := os.ReadFile(d.Log)
	if enc, ok := findSecret(log, secretA); ok {
		t.Fatalf("the daemon log holds a key (%s)", enc)
	}
}

// waitLog waits until the daemon's log holds s.
func waitLog(t *testing.T, d *kmsDaemon, s string) {
	t.Helper()
	deadline := time.Now().Add(converge)
	for {
		log, _ := os.ReadFile(d.Log)
		if bytes.Contains(log, []byte(s)) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the daemon log never said %q:\n%s", s, d.Tail(20))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestMasterKeyRotation: a new master key version seals new blobs while old
// blobs still open; retiring the old version kills the blobs sealed with it.
func TestMasterKeyRotation(t *testing.T) {
	d := startKMS(t)
	ctx := context.Background()
	n := newNode(t)
	if err := d.createNode(ctx, n, attestedNode); err != nil {
		t.Fatal(err)
	}
	oldKey := key(t)
	oldBlob := d.sealEventually(ctx, n, oldKey)
	if v, _ := custody.ParseHeader(oldBlob); v != 1 {
		t.Fatalf("first blob sealed with version %d", v)
	}
	// As an operator rotates: the shipped binary's keyring command.
	out, err := exec.Command(testutil.Bin(t, "sovrad"), "keyring", "rotate", d.KeyFile).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "added master key version 2") {
		t.Fatalf("sovrad keyring rotate: %v\n%s", err, out)
	}
	d.Restart()
	if got := d.unsealEventually(ctx, n, oldBlob); !bytes.Equal(got, oldKey) {
		t.Fatal("the old blob opened to other data after rotation")
	}
	newKey := key(t)
	newBlob := d.sealEventually(ctx, n, newKey)
	if v, _ := custody.ParseHeader(newBlob); v != 2 {
		t.Fatalf("blob after rotation sealed with version %d", v)
	}
	d.unsealEventually(ctx, n, newBlob)

	// Retire version 1: keep only the lines of the other versions.
	data, err := os.ReadFile(d.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	var kept []string
	for _, line := range strings.Split(string(data), "\n") {
		if !strings.HasPrefix(line, "1 ") {
			kept = append(kept, line)
		}
	}
	if err := os.WriteFile(d.KeyFile, []byte(strings.Join(kept, "\n")), 0o600); err != nil {
		t.Fatal(err)
	}
	d.Restart()
	if got := d.unsealEventually(ctx, n, newBlob); !bytes.Equal(got, newKey) {
		t.Fatal("the new blob opened to other data")
	}
	data2, err := d.Unseal(ctx, n.UUID, oldBlob)
	requireDenied(t, data2, err)
	waitLog(t, d, "BlobUnknownKeyVersion")
}
