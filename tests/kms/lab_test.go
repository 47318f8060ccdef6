package kms

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/kms"
)

// labAdoption bounds the time the sweeper takes to move a lab record's salt
// to the record the node enrolled (it sweeps every second).
const labAdoption = 15 * time.Second

// TestLabMode: a node nobody registered seals on its first boot (before any
// extension runs); its record is created then, its salt moves to its
// enrolled record when it enrolls, and it unseals once attested. A node
// that never enrolls is quarantined at the deadline.
func TestLabMode(t *testing.T) {
	d := startKMS(t, "--kms-lab-mode", "--attest-deadline", "4s")
	ctx := context.Background()
	n := newNode(t)
	secret := key(t)
	blob, err := d.Seal(ctx, n.UUID, secret)
	if err != nil {
		t.Fatalf("lab-mode Seal of an unknown node: %v\n%s", err, d.Tail(10))
	}
	// Talos seals EPHEMERAL right after STATE: same record, same salt.
	blob2, err := d.Seal(ctx, n.UUID, key(t))
	if err != nil {
		t.Fatalf("second Seal: %v", err)
	}
	lab := node{Name: "kms-lab-" + n.UUID, UUID: n.UUID}
	rec := d.getNode(ctx, lab)
	if rec.Labels[kms.LabelLabPending] != "true" || len(rec.Status.KeySalt) != 32 {
		t.Fatalf("lab record: labels %v, salt %d bytes", rec.Labels, len(rec.Status.KeySalt))
	}
	// Not enrolled: it opens only what it just sealed, from where it sealed
	// it (Talos opens the volume it formatted at once); from elsewhere,
	// nothing.
	data, err := d.from(elsewhere).Unseal(ctx, n.UUID, blob)
	requireDenied(t, data, err)
	if data, err := d.Unseal(ctx, n.UUID, blob); err != nil || !bytes.Equal(data, secret) {
		t.Fatalf("the lab node's Unseal of the volume it just sealed: %v", err)
	}

	// The node enrolls and attests: the enrolled record adopts the salt
	// (and the UUID's claim), and the lab record goes. Until then the lab
	// record answers for the UUID: wait for it to go, so that the Unseals
	// below are the enrolled record's.
	if err := d.createNode(ctx, n, attestedNode); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(labAdoption); ; time.Sleep(100 * time.Millisecond) {
		if out, _ := d.TryKubectl("get", "sovranode", lab.Name); !strings.Contains(out, lab.Name) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the lab record outlived the adoption by %s\n%s", labAdoption, d.Tail(20))
		}
	}
	waitEvent(t, d, n.Name, "LabRecordAdopted")
	if got := d.unsealEventually(ctx, n, blob); !bytes.Equal(got, secret) {
		t.Fatal("unsealed other data")
	}
	d.unsealEventually(ctx, n, blob2)
	d.setNodeState(ctx, n, nodeState{Enrolled: true, Attested: true, Result: v1alpha1.ResultPassed,
		Addresses: attestedNode.Addresses, AttestedAt: time.Now().Add(time.Second)})

	// A node that seals and never enrolls is quarantined at the deadline.
	ghost := newNode(t)
	if _, err := d.Seal(ctx, ghost.UUID, key(t)); err != nil {
		t.Fatal(err)
	}
	ghostLab := node{Name: "kms-lab-" + ghost.UUID, UUID: ghost.UUID}
	d.waitCondition(ctx, ghostLab, kms.ConditionQuarantined, true)
	waitLog(t, d, kms.ReasonEnrollmentMissed)
	// Quarantined: not even Seal.
	_, err = d.Seal(ctx, ghost.UUID, key(t))
	requireDenied(t, nil, err)
}
