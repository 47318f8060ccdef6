package kms

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/config/configloader"
	"k8s.io/apimachinery/pkg/api/equality"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/kms"
	"github.com/sovra-dev/sovra/internal/testutil"
)

// bootFetcher fetches the enrollment configuration as Talos does for
// talos.config=https://...: a GET over HTTPS from one source address.
type bootFetcher struct {
	url    string
	client *http.Client
}

func (k *kmsDaemon) bootFetcher(t *testing.T, bootAddr, source string) *bootFetcher {
	t.Helper()
	ca, err := os.ReadFile(filepath.Join(k.DataDir, "node-ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(ca)
	dialer := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(source)}, Timeout: 5 * time.Second}
	return &bootFetcher{
		url: "https://" + bootAddr + "/boot/config?uuid=",
		client: &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
			DialContext:     dialer.DialContext,
			TLSClientConfig: &tls.Config{RootCAs: roots, ServerName: "127.0.0.1"},
		}},
	}
}

// fetch returns the status code and body of a fetch for uuid.
func (f *bootFetcher) fetch(t *testing.T, uuid string) (int, []byte) {
	t.Helper()
	resp, err := f.client.Get(f.url + uuid)
	if err != nil {
		t.Fatalf("fetching the enrollment configuration: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, body
}

// mustFetch fetches the configuration for uuid and loads it with Talos's
// config loader.
func (f *bootFetcher) mustFetch(t *testing.T, uuid string) []byte {
	t.Helper()
	code, body := f.fetch(t, uuid)
	if code != http.StatusOK {
		t.Fatalf("fetch for %s: HTTP %d: %s", uuid, code, body)
	}
	if _, err := configloader.NewFromBytes(body); err != nil {
		t.Fatalf("the enrollment configuration does not load: %v", err)
	}
	return body
}

// startBoot starts sovrad with the boot server and returns its address.
func startBoot(t *testing.T, extra ...string) (*kmsDaemon, string) {
	t.Helper()
	bootAddr := "127.0.0.1:" + strconv.Itoa(testutil.FreePort(t))
	d := startKMS(t, append([]string{"--boot-listen", bootAddr, "--attest-deadline", "3s"}, extra...)...)
	return d, bootAddr
}

// TestPendingMachine: a machine sovra never saw fetches the enrollment
// configuration; that admits its first Seals from the fetching address and
// nowhere else, it opens only what it has just sealed, and its enrolled
// record adopts the salt. What no anonymous caller can do with a UUID and
// the boot server: seal or open for a machine that fetched from elsewhere,
// open a sealing window on an enrolled machine, or enumerate UUIDs.
func TestPendingMachine(t *testing.T) {
	d, bootAddr := startBoot(t)
	ctx := context.Background()
	// known is an enrolled machine.
	known := newNode(t)
	if err := d.createNode(ctx, known, attestedNode); err != nil {
		t.Fatal(err)
	}
	d.sealEventually(ctx, known, key(t))
	machine := d.bootFetcher(t, bootAddr, "127.0.0.1")
	attacker := d.bootFetcher(t, bootAddr, attackerAddr)
	fromAttacker := d.from(attackerAddr)

	n := newNode(t)
	cfg := machine.mustFetch(t, n.UUID)
	for _, want := range []string{"ExtensionServiceConfig", "sovra-agent", "VolumeConfig", "STATE", "EPHEMERAL", "NetworkDefaultActionConfig"} {
		if !bytes.Contains(cfg, []byte(want)) {
			t.Errorf("the enrollment configuration has no %s", want)
		}
	}
	// Each fetch gets its own Talos identity: no machine can reach
	// another's Talos API with what its configuration holds.
	other := machine.mustFetch(t, newNode(t).UUID)
	if bytes.Equal(talosCA(t, cfg), talosCA(t, other)) {
		t.Error("two enrollment configurations share a Talos API CA")
	}

	pending := node{Name: "boot-" + n.UUID, UUID: n.UUID}
	rec := d.getNode(ctx, pending)
	if rec.Labels[kms.LabelLabPending] != "true" || strings.Join(rec.Spec.Addresses, ",") != "127.0.0.1" {
		t.Fatalf("pending record: labels %v, addresses %v", rec.Labels, rec.Spec.Addresses)
	}

	// The attacker knows the UUID: no Seal from elsewhere, answered as for
	// an unknown UUID.
	_, err := fromAttacker.Seal(ctx, n.UUID, key(t))
	requireDenied(t, nil, err)
	// A second fetch from elsewhere opens nothing for the attacker.
	if code, body := attacker.fetch(t, n.UUID); code != http.StatusOK {
		t.Fatalf("a fetch for a pending UUID from elsewhere: HTTP %d: %s", code, body)
	}
	_, err = fromAttacker.Seal(ctx, n.UUID, key(t))
	requireDenied(t, nil, err)

	// The machine formats STATE and EPHEMERAL.
	secret := key(t)
	blob, err := d.Seal(ctx, n.UUID, secret)
	if err != nil {
		t.Fatalf("the pending machine's first Seal: %v\n%s", err, d.Tail(10))
	}
	if _, err := d.Seal(ctx, n.UUID, key(t)); err != nil {
		t.Fatalf("the pending machine's second Seal: %v", err)
	}
	// It opens what it sealed (the reboot after install), from its address
	// only; a blob of the attacker's making does not open.
	if got, err := d.Unseal(ctx, n.UUID, blob); err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("the pending machine's Unseal of its fresh seal: %v", err)
	}
	data, err := fromAttacker.Unseal(ctx, n.UUID, blob)
	requireDenied(t, data, err)
	forged := bytes.Clone(blob)
	forged[len(forged)-1] ^= 1
	data, err = d.Unseal(ctx, n.UUID, forged)
	requireDenied(t, data, err)

	// The machine enrolls from the address it sealed from: the enrolled
	// record adopts the salt; the blob keeps opening.
	if err := d.createNode(ctx, n, attestedNode); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, d, n.Name, "LabRecordAdopted")
	if out, _ := d.TryKubectl("get", "sovranode", pending.Name); strings.Contains(out, n.UUID) {
		t.Fatal("the pending record outlived the adoption")
	}
	if got := d.unsealEventually(ctx, n, blob); !bytes.Equal(got, secret) {
		t.Fatal("unsealed other data after adoption")
	}

	// An enrolled machine's UUID: the boot server serves the configuration
	// and opens no window; nobody can seal for it, from anywhere.
	offset := d.LogSize()
	before := d.getNode(ctx, known)
	if code, _ := attacker.fetch(t, known.UUID); code != http.StatusOK {
		t.Fatalf("a fetch for an enrolled UUID answered HTTP %d", code)
	}
	if after := d.getNode(ctx, known); !equality.Semantic.DeepEqual(before.Status.Sealing, after.Status.Sealing) {
		t.Fatalf("a fetch for an enrolled UUID changed its record: sealing %+v, then %+v", before.Status.Sealing, after.Status.Sealing)
	}
	if out, _ := d.TryKubectl("get", "sovranode", "boot-"+known.UUID); strings.Contains(out, known.UUID) {
		t.Fatal("a fetch for an enrolled UUID made a pending record")
	}
	if !strings.Contains(d.LogSince(offset), "no sealing window opened") {
		t.Fatalf("the fetch for an enrolled UUID is not in the log:\n%s", d.Tail(10))
	}

	// Bad input: a clear error, nothing recorded.
	code, body := attacker.fetch(t, "../../etc/passwd")
	if code != http.StatusBadRequest || !strings.Contains(string(body), "not a machine UUID") {
		t.Fatalf("a bad UUID: HTTP %d: %s", code, body)
	}
}

// TestPendingMachineAdoptedElsewhere: a pending record whose seals came from
// another address than the one the machine enrolls from is not adopted: its
// blobs open no more, and the operator hears about it.
func TestPendingMachineAdoptedElsewhere(t *testing.T) {
	d, bootAddr := startBoot(t)
	ctx := context.Background()
	n := newNode(t)
	// The attacker fetched first and sealed a volume of its making.
	d.bootFetcher(t, bootAddr, attackerAddr).mustFetch(t, n.UUID)
	forgedState, err := d.from(attackerAddr).Seal(ctx, n.UUID, key(t))
	if err != nil {
		t.Fatalf("the first fetcher's Seal: %v\n%s", err, d.Tail(30))
	}
	// The real machine enrolls from its own address.
	if err := d.createNode(ctx, n, attestedNode); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, d, n.Name, "PendingSealsDiscarded")
	d.deniedEventually(ctx, n, forgedState)
	if out, _ := d.TryKubectl("get", "sovranode", "boot-"+n.UUID); strings.Contains(out, n.UUID) {
		t.Fatal("the pending record outlived the enrollment")
	}
}

// TestBootServerLimits: one source cannot fetch more than its burst, and
// past --boot-max-pending a fetch serves the configuration but admits no
// Seal.
func TestBootServerLimits(t *testing.T) {
	d, bootAddr := startBoot(t, "--boot-max-pending", "2")
	ctx := context.Background()
	f := d.bootFetcher(t, bootAddr, "127.0.0.1")
	var uuids []string
	limited := 0
	for range 12 {
		n := newNode(t)
		code, body := f.fetch(t, n.UUID)
		switch code {
		case http.StatusOK:
			uuids = append(uuids, n.UUID)
		case http.StatusTooManyRequests:
			limited++
		default:
			t.Fatalf("HTTP %d: %s", code, body)
		}
	}
	if limited == 0 || len(uuids) < 3 {
		t.Fatalf("12 fetches at once from one source: %d served, %d limited", len(uuids), limited)
	}
	sealed := 0
	for _, u := range uuids {
		if _, err := d.Seal(ctx, u, key(t)); err == nil {
			sealed++
		}
	}
	if sealed != 2 {
		t.Fatalf("%d of %d fetched machines sealed; --boot-max-pending is 2", sealed, len(uuids))
	}
	var list v1alpha1.SovraNodeList
	if err := d.kube.List(ctx, &list); err != nil {
		t.Fatal(err)
	}
	if len(list.Items) != 2 {
		t.Fatalf("%d records after %d fetches; want 2 pending", len(list.Items), len(uuids))
	}
	t.Logf("12 fetches from one source: %d served, %d limited; %d pending records", len(uuids), limited, len(list.Items))
}

// talosCA returns the key of the Talos API CA a configuration holds.
func talosCA(t *testing.T, cfg []byte) []byte {
	t.Helper()
	c, err := configloader.NewFromBytes(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ca := c.Machine().Security().IssuingCA()
	if ca == nil || len(ca.Key) == 0 {
		t.Fatal("the enrollment configuration has no Talos API CA")
	}
	return ca.Key
}
