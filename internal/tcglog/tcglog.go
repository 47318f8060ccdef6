// Package tcglog writes TCG PC Client crypto-agile event logs with SHA-256
// digests, the format of /sys/kernel/security/tpm0/binary_bios_measurements.
// Tests use it to play the firmware: measure events into a TPM's PCRs and
// hand the agent the matching log.
package tcglog

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
)

// Event types used by firmware (TCG PC Client Platform Firmware Profile).
const (
	EVPostCode           = 0x00000001
	EVNoAction           = 0x00000003
	EVSeparator          = 0x00000004
	EVAction             = 0x00000005
	EVEFIVariableDriver  = 0x80000001
	EVEFIBootServicesApp = 0x80000003

	algSHA256  = 0x000b
	digestSize = sha256.Size
	sha1Size   = 20
)

// specIDSignature opens the Spec ID event that announces a crypto-agile log.
var specIDSignature = []byte("Spec ID Event03\x00")

// Event is one measurement.
type Event struct {
	PCR    int
	Type   uint32
	Data   []byte
	Digest [digestSize]byte
}

// Log accumulates events and the PCR values they replay to. The zero value is
// an empty log.
type Log struct {
	Events []Event
}

// Measure appends an event whose digest is SHA-256(data) and returns it.
func (l *Log) Measure(pcr int, typ uint32, data []byte) Event {
	e := Event{PCR: pcr, Type: typ, Data: data, Digest: sha256.Sum256(data)}
	l.Events = append(l.Events, e)
	return e
}

// PCRs returns the SHA-256 PCR values the events replay to, for every PCR
// that has at least one event.
func (l *Log) PCRs() map[int][]byte {
	out := map[int][]byte{}
	for _, e := range l.Events {
		cur, ok := out[e.PCR]
		if !ok {
			cur = make([]byte, digestSize)
		}
		h := sha256.New()
		h.Write(cur)
		h.Write(e.Digest[:])
		out[e.PCR] = h.Sum(nil)
	}
	return out
}

// Bytes encodes the log: the SHA-1-format Spec ID event, then one
// TCG_PCR_EVENT2 per event with its SHA-256 digest.
func (l *Log) Bytes() []byte {
	var b bytes.Buffer
	le := func(v any) { _ = binary.Write(&b, binary.LittleEndian, v) }

	var spec bytes.Buffer
	spec.Write(specIDSignature)
	_ = binary.Write(&spec, binary.LittleEndian, uint32(0)) // platform class: client
	spec.Write([]byte{0, 2, 0, 2})                          // minor, major, errata, uintn size
	_ = binary.Write(&spec, binary.LittleEndian, uint32(1)) // one algorithm
	_ = binary.Write(&spec, binary.LittleEndian, uint16(algSHA256))
	_ = binary.Write(&spec, binary.LittleEndian, uint16(digestSize))
	spec.WriteByte(0) // no vendor info

	le(uint32(0))
	le(uint32(EVNoAction))
	b.Write(make([]byte, sha1Size)) // the SHA-1 digest field, zero
	le(uint32(spec.Len()))
	b.Write(spec.Bytes())

	for _, e := range l.Events {
		le(uint32(e.PCR))
		le(e.Type)
		le(uint32(1))
		le(uint16(algSHA256))
		b.Write(e.Digest[:])
		le(uint32(len(e.Data)))
		b.Write(e.Data)
	}
	return b.Bytes()
}

// Firmware returns a plausible boot log: a post code, a Secure Boot variable,
// a boot application and the separator in each of PCRs 0-7, so every PCR that
// a quote replays has events.
func Firmware() *Log {
	l := &Log{}
	l.Measure(0, EVPostCode, []byte("sovra test firmware"))
	l.Measure(7, EVEFIVariableDriver, []byte("SecureBoot=1"))
	l.Measure(4, EVEFIBootServicesApp, []byte("talos-uki"))
	for pcr := 0; pcr <= 7; pcr++ {
		l.Measure(pcr, EVSeparator, []byte{0, 0, 0, 0})
	}
	return l
}
