package kms

import (
	"context"
	"crypto/tls"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/internal/testutil"
)

// TestBootConfigPendingRecord: a new machine that fetches the enrollment
// configuration from the boot server gets a pending record, boot-UUID with
// the all-zero placeholder EK hash, which the SovraNode name rule admits
// although its name is not ek-HASH; the machine may then seal its first
// volume from the address it fetched from.
func TestBootConfigPendingRecord(t *testing.T) {
	bootAddr := "127.0.0.1:" + strconv.Itoa(testutil.FreePort(t))
	d := startKMS(t, "--boot-listen", bootAddr)
	ctx := context.Background()
	n := newNode(t)

	from := d.LogSize()
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: d.roots, MinVersion: tls.VersionTLS13}}}
	resp, err := hc.Get("https://" + bootAddr + "/boot/config?uuid=" + n.UUID)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("boot config fetch: %s: %s\n%s", resp.Status, body, d.LogSince(from))
	}
	if log := d.LogSince(from); !strings.Contains(log, `"sealing":"Created"`) {
		t.Fatalf("the fetch opened no sealing window:\n%s", log)
	}
	pending := d.getNode(ctx, node{Name: "boot-" + n.UUID})
	if pending.Labels[v1alpha1.LabelLabPending] != "true" || pending.Spec.EKHash != strings.Repeat("0", 64) {
		t.Fatalf("pending record: labels %v, ekHash %q", pending.Labels, pending.Spec.EKHash)
	}
	d.sealEventually(ctx, node{Name: pending.Name, UUID: n.UUID}, key(t))
}
