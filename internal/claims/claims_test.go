package claims

import (
	"bytes"
	"errors"
	"os"
	"testing"

	"github.com/sovra-dev/sovra/internal/attest/attesttest"
)

func sample() Set {
	s := Set{}
	s.Set(SecureBoot, "enabled")
	s.Set(Lockdown, "integrity")
	s.SetErr(SELinux, errors.New("reading /sys/fs/selinux/enforce: permission denied"))
	s.Set(TalosVersion, "v1.13.0")
	s.Set(ExtensionPrefix+"sovra-agent", "v0.1.0@sha256:00ff")
	return s
}

func TestRoundTrip(t *testing.T) {
	s := sample()
	b, err := s.Encode()
	if err != nil {
		t.Fatal(err)
	}
	got, err := Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(s) {
		t.Fatalf("decoded %d claims, want %d", len(got), len(s))
	}
	for n, c := range s {
		if got[n] != c {
			t.Errorf("claim %s = %+v, want %+v", n, got[n], c)
		}
	}
	again, _ := got.Encode()
	if !bytes.Equal(again, b) {
		t.Fatal("encoding is not canonical")
	}
}

func TestDecodeRejects(t *testing.T) {
	good, _ := sample().Encode()
	for name, b := range map[string][]byte{
		"empty":     nil,
		"version":   append([]byte{2}, good[1:]...),
		"trailing":  append(append([]byte{}, good...), 0),
		"truncated": good[:len(good)-1],
		"unsorted":  {1, 0, 2, 0, 1, 'b', 0, 0, 0, 0, 1, 'a', 0, 0, 0},
		"duplicate": {1, 0, 2, 0, 1, 'a', 0, 0, 0, 0, 1, 'a', 0, 0, 0},
		"kind":      {1, 0, 1, 0, 1, 'a', 7, 0, 0},
		"emptyerr":  {1, 0, 1, 0, 1, 'a', 1, 0, 0},
		"badname":   {1, 0, 1, 0, 1, ' ', 0, 0, 0},
		"notutf8":   {1, 0, 1, 0, 1, 'a', 0, 0, 1, 0xff},
		"count":     {1, 0xff, 0xff},
		"oversized": make([]byte, MaxEncodedLen+1),
	} {
		if _, err := Decode(b); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: Decode error = %v, want ErrMalformed", name, err)
		}
	}
}

func TestExtraDataBindsClaims(t *testing.T) {
	nonce := bytes.Repeat([]byte{1}, 32)
	a, _ := sample().Encode()
	s := sample()
	s.Set(SecureBoot, "disabled")
	b, _ := s.Encode()
	if bytes.Equal(ExtraData(nonce, a), ExtraData(nonce, b)) {
		t.Fatal("different claims gave the same extraData")
	}
}

func FuzzDecode(f *testing.F) {
	good, _ := sample().Encode()
	f.Add(good)
	f.Add([]byte{1, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := Decode(b)
		if err != nil {
			return
		}
		again, err := s.Encode()
		if err != nil {
			t.Fatalf("decoded set does not encode: %v", err)
		}
		if !bytes.Equal(again, b) {
			t.Fatalf("decode then encode changed the bytes")
		}
	})
}

// TestWriteFuzzSeeds rewrites the seed corpus when SOVRA_WRITE_FUZZ_SEEDS
// is set.
func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("SOVRA_WRITE_FUZZ_SEEDS") == "" {
		t.Skip("set SOVRA_WRITE_FUZZ_SEEDS=1 to rewrite testdata/fuzz")
	}
	good, _ := sample().Encode()
	empty, _ := Set{}.Encode()
	for name, b := range map[string][]byte{"sample": good, "empty-set": empty, "unsorted": {1, 0, 2, 0, 1, 'b', 0, 0, 0, 0, 1, 'a', 0, 0, 0}} {
		if err := attesttest.WriteSeed(".", "FuzzDecode", name, b); err != nil {
			t.Fatal(err)
		}
	}
}
