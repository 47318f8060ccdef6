package attest_test

import (
	"crypto/rand"
	"crypto/x509"
	"os"
	"testing"
	"time"

	goattest "github.com/google/go-attestation/attest"

	"github.com/sovra-dev/sovra/internal/attest"
	"github.com/sovra-dev/sovra/internal/attest/attesttest"
	"github.com/sovra-dev/sovra/internal/tcglog"
)

// The fuzz targets cover every decoder of node input in this package: the
// event log, the EK, the quote with its signature and claims, and the AK
// creation parameters. Seeds are in testdata/fuzz; TestWriteFuzzSeeds
// rewrites them from the recorded fixture.

func FuzzReplay(f *testing.F) {
	fx := fixture(f)
	f.Add(fx.EventLog)
	f.Fuzz(func(t *testing.T, log []byte) {
		if counts, err := attest.Replay(log, fx.PCRs); err == nil && len(counts) != len(attest.ReplayedPCRs) {
			t.Fatalf("replay passed with events for %d PCRs", len(counts))
		}
	})
}

func FuzzParseEK(f *testing.F) {
	fx := fixture(f)
	ek, _ := attest.ParseEK(fx.EKCertificate, nil)
	pub, _ := x509.MarshalPKIXPublicKey(ek.Public)
	f.Add(fx.EKCertificate, []byte(nil))
	f.Add([]byte(nil), pub)
	f.Fuzz(func(t *testing.T, cert, pub []byte) {
		ek, err := attest.ParseEK(cert, pub)
		if err != nil {
			return
		}
		if len(ek.Hash) != 64 {
			t.Fatalf("EK hash %q", ek.Hash)
		}
		_ = (attest.EKPolicy{TrustOnFirstUse: true}).Admit(ek, time.Now())
	})
}

func FuzzVerify(f *testing.F) {
	fx := fixture(f)
	f.Add(fx.Claims, fx.Quote, fx.Signature, fx.EventLog)
	f.Fuzz(func(t *testing.T, claims, quote, sig, log []byte) {
		e := attest.Evidence{AKPublic: fx.AKPublic, Nonce: fx.Nonce, Claims: claims, Quote: quote,
			Signature: sig, PCRHash: uint16(attest.QuoteHash), PCRs: fx.PCRs, EventLog: log}
		if _, err := attest.Verify(e); err == nil && string(quote) != string(fx.Quote) {
			t.Fatal("a quote other than the TPM's verified")
		}
	})
}

func FuzzChallenge(f *testing.F) {
	fx := fixture(f)
	ek, _ := attest.ParseEK(fx.EKCertificate, nil)
	f.Add(fx.AKPublic, fx.AKCreateData, fx.AKCreateAttestation, fx.AKCreateSignature)
	f.Fuzz(func(t *testing.T, public, data, att, sig []byte) {
		_, _, _ = attest.Challenge(ek, goattest.AttestationParameters{
			Public: public, CreateData: data, CreateAttestation: att, CreateSignature: sig,
		}, rand.Reader)
	})
}

// TestWriteFuzzSeeds rewrites the seed corpora when SOVRA_WRITE_FUZZ_SEEDS
// is set.
func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("SOVRA_WRITE_FUZZ_SEEDS") == "" {
		t.Skip("set SOVRA_WRITE_FUZZ_SEEDS=1 to rewrite testdata/fuzz")
	}
	fx := fixture(t)
	ek, _ := attest.ParseEK(fx.EKCertificate, nil)
	pub, _ := x509.MarshalPKIXPublicKey(ek.Public)
	header := (&tcglog.Log{}).Bytes()
	seeds := []struct {
		target, name string
		args         [][]byte
	}{
		{"FuzzReplay", "recorded", [][]byte{fx.EventLog}},
		{"FuzzReplay", "firmware", [][]byte{tcglog.Firmware().Bytes()}},
		{"FuzzReplay", "header-only", [][]byte{header}},
		{"FuzzParseEK", "certificate", [][]byte{fx.EKCertificate, nil}},
		{"FuzzParseEK", "public", [][]byte{nil, pub}},
		{"FuzzVerify", "recorded", [][]byte{fx.Claims, fx.Quote, fx.Signature, fx.EventLog}},
		{"FuzzVerify", "empty", [][]byte{nil, nil, nil, nil}},
		{"FuzzChallenge", "recorded", [][]byte{fx.AKPublic, fx.AKCreateData, fx.AKCreateAttestation, fx.AKCreateSignature}},
	}
	for _, s := range seeds {
		if err := attesttest.WriteSeed(".", s.target, s.name, s.args...); err != nil {
			t.Fatal(err)
		}
	}
}
