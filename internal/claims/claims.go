// Package claims is the canonical encoding of the facts a node reports about
// its boot (Secure Boot, lockdown, LSMs, Talos version, extensions, the hash of
// its in-memory node key). The agent hashes this encoding into the quote's
// extraData, so the daemon can trust claims only when they decode from exactly
// the bytes that were quoted.
package claims

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"sort"
	"strings"
	"unicode/utf8"
)

// Well-known claim names. Extensions use ExtensionPrefix + the extension name.
const (
	SecureBoot      = "secureboot"
	Lockdown        = "kernel.lockdown"
	SELinux         = "lsm.selinux"
	AppArmor        = "lsm.apparmor"
	TalosVersion    = "talos.version"
	NodeKeySHA256   = "nodekey.sha256"
	ExtensionPrefix = "extension/"
)

// The boot an attestation reports: the kernel's boot ID and the boot's start
// (Unix seconds). The daemon attributes the key releases Talos made early in
// a boot to it.
const (
	BootID      = "boot.id"
	BootStarted = "boot.started"
)

// Limits of the encoding; Decode rejects anything larger.
const (
	// Version is the first byte of every encoding.
	Version = 1
	// MaxClaims is the largest number of claims in one set.
	MaxClaims = 256
	// MaxNameLen is the longest claim name in bytes.
	MaxNameLen = 128
	// MaxValueLen is the longest value or error text in bytes.
	MaxValueLen = 1024
	// MaxEncodedLen bounds a whole encoding.
	MaxEncodedLen = 1 + 2 + MaxClaims*(2+MaxNameLen+1+2+MaxValueLen)

	kindValue = 0
	kindError = 1
)

// ErrMalformed is wrapped by every Decode error.
var ErrMalformed = errors.New("malformed claims")

// Claim is one fact: either a value, or the error met reading it (Err non-empty).
type Claim struct {
	Value string
	Err   string
}

// Set maps claim names to claims. A nil Set is empty.
type Set map[string]Claim

// Set records a value for name.
func (s Set) Set(name, value string) { s[name] = Claim{Value: value} }

// SetErr records that name could not be read, with why. An empty why is
// recorded as "unknown error" so the claim stays an error.
func (s Set) SetErr(name string, why error) {
	msg := "unknown error"
	if why != nil && why.Error() != "" {
		msg = why.Error()
	}
	if len(msg) > MaxValueLen {
		msg = msg[:MaxValueLen]
		for !utf8.ValidString(msg) {
			msg = msg[:len(msg)-1]
		}
	}
	s[name] = Claim{Err: msg}
}

// Value returns the value of name and whether it is present without error.
func (s Set) Value(name string) (string, bool) {
	c, ok := s[name]
	if !ok || c.Err != "" {
		return "", false
	}
	return c.Value, true
}

// Names returns the claim names in canonical (byte-wise) order.
func (s Set) Names() []string {
	names := make([]string, 0, len(s))
	for n := range s {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Encode returns the canonical encoding: the version byte, a big-endian
// uint16 count, then per claim in byte-wise name order: uint16 name length,
// name, kind byte (0 value, 1 error), uint16 length, value or error text.
// Equal sets always encode to equal bytes.
func (s Set) Encode() ([]byte, error) {
	if len(s) > MaxClaims {
		return nil, fmt.Errorf("encoding claims: %d claims, at most %d", len(s), MaxClaims)
	}
	var b bytes.Buffer
	b.WriteByte(Version)
	b.Write(binary.BigEndian.AppendUint16(nil, uint16(len(s))))
	for _, n := range s.Names() {
		c := s[n]
		if err := checkName(n); err != nil {
			return nil, fmt.Errorf("encoding claims: %w", err)
		}
		kind, text := byte(kindValue), c.Value
		if c.Err != "" {
			kind, text = kindError, c.Err
		}
		if len(text) > MaxValueLen || !utf8.ValidString(text) {
			return nil, fmt.Errorf("encoding claims: value of %q is not UTF-8 of at most %d bytes", n, MaxValueLen)
		}
		b.Write(binary.BigEndian.AppendUint16(nil, uint16(len(n))))
		b.WriteString(n)
		b.WriteByte(kind)
		b.Write(binary.BigEndian.AppendUint16(nil, uint16(len(text))))
		b.WriteString(text)
	}
	return b.Bytes(), nil
}

// Decode parses a canonical encoding. It accepts only what Encode produces:
// names sorted and unique, UTF-8 text, known kinds, no trailing bytes.
func Decode(b []byte) (Set, error) {
	if len(b) > MaxEncodedLen {
		return nil, fmt.Errorf("%w: %d bytes, at most %d", ErrMalformed, len(b), MaxEncodedLen)
	}
	r := reader{b: b}
	if v := r.byte(); v != Version {
		return nil, fmt.Errorf("%w: version %d, want %d", ErrMalformed, v, Version)
	}
	n := int(r.uint16())
	if r.err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMalformed, r.err)
	}
	if n > MaxClaims {
		return nil, fmt.Errorf("%w: %d claims, at most %d", ErrMalformed, n, MaxClaims)
	}
	s := make(Set, n)
	prev := ""
	for i := range n {
		name := r.text(MaxNameLen)
		kind := r.byte()
		text := r.text(MaxValueLen)
		if r.err != nil {
			return nil, fmt.Errorf("%w: claim %d: %v", ErrMalformed, i, r.err)
		}
		if err := checkName(name); err != nil {
			return nil, fmt.Errorf("%w: claim %d: %v", ErrMalformed, i, err)
		}
		if i > 0 && name <= prev {
			return nil, fmt.Errorf("%w: claim %q out of order or repeated", ErrMalformed, name)
		}
		prev = name
		switch kind {
		case kindValue:
			s[name] = Claim{Value: text}
		case kindError:
			if text == "" {
				return nil, fmt.Errorf("%w: claim %q has an empty error", ErrMalformed, name)
			}
			s[name] = Claim{Err: text}
		default:
			return nil, fmt.Errorf("%w: claim %q has unknown kind %d", ErrMalformed, name, kind)
		}
	}
	if len(r.b) != 0 {
		return nil, fmt.Errorf("%w: %d trailing bytes", ErrMalformed, len(r.b))
	}
	return s, nil
}

// ExtraData is what the agent passes to TPM2_Quote as qualifying data:
// SHA-256(nonce || canonical claims).
func ExtraData(nonce, encoded []byte) []byte {
	h := sha256.New()
	h.Write(nonce)
	h.Write(encoded)
	return h.Sum(nil)
}

func checkName(n string) error {
	if n == "" || len(n) > MaxNameLen {
		return fmt.Errorf("claim name of %d bytes, want 1 to %d", len(n), MaxNameLen)
	}
	for _, c := range n {
		if c < 0x21 || c > 0x7e {
			return fmt.Errorf("claim name %q has a character outside printable ASCII", n)
		}
	}
	if strings.ContainsAny(n, `"\`) {
		return fmt.Errorf("claim name %q has a quote or backslash", n)
	}
	return nil
}

// reader consumes b; the first error sticks and every later read returns zero.
type reader struct {
	b   []byte
	err error
}

func (r *reader) take(n int) []byte {
	if r.err != nil {
		return nil
	}
	if len(r.b) < n {
		r.err = errors.New("truncated")
		return nil
	}
	out := r.b[:n]
	r.b = r.b[n:]
	return out
}

func (r *reader) byte() byte {
	if b := r.take(1); b != nil {
		return b[0]
	}
	return 0
}

func (r *reader) uint16() uint16 {
	if b := r.take(2); b != nil {
		return binary.BigEndian.Uint16(b)
	}
	return 0
}

func (r *reader) text(limit int) string {
	n := int(r.uint16())
	if r.err != nil {
		return ""
	}
	if n > limit {
		r.err = fmt.Errorf("field of %d bytes, at most %d", n, limit)
		return ""
	}
	b := r.take(n)
	if r.err != nil {
		return ""
	}
	if !utf8.Valid(b) {
		r.err = errors.New("field is not UTF-8")
		return ""
	}
	return string(b)
}
