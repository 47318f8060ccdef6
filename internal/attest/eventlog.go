package attest

import (
	"crypto"
	"fmt"
	"slices"

	"github.com/google/go-attestation/attest"
)

// Replay parses a TCG event log and replays its SHA-256 digests for every PCR
// in ReplayedPCRs, requiring each replay to equal the quoted value and each of
// those PCRs to have at least one event: an empty or partial log never passes,
// even when the PCRs are still at their reset value. It returns the number of
// events replayed per PCR.
func Replay(eventLog []byte, pcrs map[int][]byte) (map[int]int, error) {
	if len(eventLog) == 0 || len(eventLog) > MaxEventLogLen {
		return nil, fmt.Errorf("%w: event log of %d bytes, want 1 to %d", ErrMalformed, len(eventLog), MaxEventLogLen)
	}
	el, err := attest.ParseEventLog(eventLog)
	if err != nil {
		return nil, fmt.Errorf("%w: parsing: %v", ErrEventLog, err)
	}
	if !slices.Contains(el.Algs, attest.HashSHA256) {
		return nil, fmt.Errorf("%w: log has no SHA-256 digests", ErrEventLog)
	}
	want := make([]attest.PCR, 0, len(ReplayedPCRs))
	for _, i := range ReplayedPCRs {
		d, ok := pcrs[i]
		if !ok {
			return nil, fmt.Errorf("%w: no value for PCR %d", ErrEventLog, i)
		}
		want = append(want, attest.PCR{Index: i, Digest: d, DigestAlg: crypto.SHA256})
	}
	events, err := el.Verify(want)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrEventLog, err)
	}
	counts := make(map[int]int, len(ReplayedPCRs))
	for _, ev := range events {
		counts[ev.Index]++
	}
	for _, i := range ReplayedPCRs {
		if counts[i] == 0 {
			return nil, fmt.Errorf("%w: no events for PCR %d", ErrEventLog, i)
		}
	}
	return counts, nil
}
