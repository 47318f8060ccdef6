package tcglog

import (
	"crypto"
	"testing"

	"github.com/google/go-attestation/attest"
)

// TestLogReplays: go-attestation parses the log and replays it to PCRs().
func TestLogReplays(t *testing.T) {
	l := Firmware()
	el, err := attest.ParseEventLog(l.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	var pcrs []attest.PCR
	for i, d := range l.PCRs() {
		pcrs = append(pcrs, attest.PCR{Index: i, Digest: d, DigestAlg: crypto.SHA256})
	}
	events, err := el.Verify(pcrs)
	if err != nil {
		t.Fatal(err)
	}
	if len(events) != len(l.Events) {
		t.Fatalf("replayed %d events, want %d", len(events), len(l.Events))
	}
}
