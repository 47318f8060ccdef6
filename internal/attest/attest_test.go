package attest_test

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"maps"
	"testing"
	"time"

	goattest "github.com/google/go-attestation/attest"

	"github.com/sovra-dev/sovra/internal/attest"
	"github.com/sovra-dev/sovra/internal/attest/attesttest"
	"github.com/sovra-dev/sovra/internal/claims"
	"github.com/sovra-dev/sovra/internal/tcglog"
)

func fixture(t testing.TB) *attesttest.Fixture {
	t.Helper()
	f, err := attesttest.Load()
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func evidence(f *attesttest.Fixture) attest.Evidence {
	return attest.Evidence{
		AKPublic: f.AKPublic, Nonce: f.Nonce, Claims: f.Claims, Quote: f.Quote,
		Signature: f.Signature, PCRHash: uint16(attest.QuoteHash), PCRs: maps.Clone(f.PCRs), EventLog: f.EventLog,
	}
}

func TestVerifyFixture(t *testing.T) {
	v, err := attest.Verify(evidence(fixture(t)))
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if got, _ := v.Claims.Value(claims.SecureBoot); got != "enabled" {
		t.Errorf("secureboot claim = %q", got)
	}
	for _, i := range attest.ReplayedPCRs {
		if v.Events[i] == 0 {
			t.Errorf("no events replayed for PCR %d", i)
		}
	}
}

func TestVerifyRejects(t *testing.T) {
	f := fixture(t)
	flip := func(b []byte, i int) []byte { b = bytes.Clone(b); b[i] ^= 1; return b }
	for name, tc := range map[string]struct {
		mutate func(*attest.Evidence)
		want   error
	}{
		"other nonce":      {func(e *attest.Evidence) { e.Nonce = flip(e.Nonce, 0) }, attest.ErrExtraData},
		"short nonce":      {func(e *attest.Evidence) { e.Nonce = e.Nonce[:16] }, attest.ErrMalformed},
		"altered claims":   {func(e *attest.Evidence) { e.Claims = flip(e.Claims, len(e.Claims)-1) }, attest.ErrExtraData},
		"garbage claims":   {func(e *attest.Evidence) { e.Claims = []byte{9} }, attest.ErrMalformed},
		"altered quote":    {func(e *attest.Evidence) { e.Quote = flip(e.Quote, len(e.Quote)-1) }, attest.ErrSignature},
		"bad signature":    {func(e *attest.Evidence) { e.Signature = flip(e.Signature, len(e.Signature)-1) }, attest.ErrSignature},
		"altered PCR":      {func(e *attest.Evidence) { e.PCRs[11] = flip(e.PCRs[11], 0) }, attest.ErrPCRDigest},
		"missing PCR":      {func(e *attest.Evidence) { delete(e.PCRs, 11) }, attest.ErrPCRSelection},
		"SHA-1 bank":       {func(e *attest.Evidence) { e.PCRHash = 0x0004 }, attest.ErrHashAlgorithm},
		"empty event log":  {func(e *attest.Evidence) { e.EventLog = nil }, attest.ErrMalformed},
		"tampered log":     {func(e *attest.Evidence) { e.EventLog = flip(e.EventLog, len(e.EventLog)-40) }, attest.ErrEventLog},
		"truncated log":    {func(e *attest.Evidence) { e.EventLog = e.EventLog[:len(e.EventLog)-10] }, attest.ErrEventLog},
		"oversized log":    {func(e *attest.Evidence) { e.EventLog = make([]byte, attest.MaxEventLogLen+1) }, attest.ErrMalformed},
		"oversized quote":  {func(e *attest.Evidence) { e.Quote = make([]byte, attest.MaxQuoteLen+1) }, attest.ErrMalformed},
		"other pinned AK":  {func(e *attest.Evidence) { e.AKPublic = flip(e.AKPublic, len(e.AKPublic)-1) }, attest.ErrSignature},
		"garbage pinnedAK": {func(e *attest.Evidence) { e.AKPublic = []byte{1, 2, 3} }, attest.ErrMalformed},
	} {
		t.Run(name, func(t *testing.T) {
			e := evidence(f)
			tc.mutate(&e)
			if _, err := attest.Verify(e); !errors.Is(err, tc.want) {
				t.Fatalf("Verify error = %v, want %v", err, tc.want)
			}
		})
	}
}

// TestReplayRefusesEmptyLog: PCRs at their reset value replay from an empty
// log, which go-tpm-tools' VerifyAttestation was seen to accept.
func TestReplayRefusesEmptyLog(t *testing.T) {
	zero := map[int][]byte{}
	for _, i := range attest.QuotedPCRs {
		zero[i] = make([]byte, sha256.Size)
	}
	empty := (&tcglog.Log{}).Bytes()
	if _, err := attest.Replay(empty, zero); !errors.Is(err, attest.ErrEventLog) {
		t.Fatalf("Replay of an empty log = %v, want ErrEventLog", err)
	}
	partial := &tcglog.Log{}
	partial.Measure(0, tcglog.EVSeparator, []byte{0, 0, 0, 0})
	pcrs := maps.Clone(zero)
	maps.Copy(pcrs, partial.PCRs())
	if _, err := attest.Replay(partial.Bytes(), pcrs); !errors.Is(err, attest.ErrEventLog) {
		t.Fatalf("Replay of a log without PCRs 1-7 = %v, want ErrEventLog", err)
	}
	full := tcglog.Firmware()
	maps.Copy(pcrs, full.PCRs())
	if _, err := attest.Replay(full.Bytes(), pcrs); err != nil {
		t.Fatalf("Replay of a full log: %v", err)
	}
}

func ekPolicy(t testing.TB, f *attesttest.Fixture) attest.EKPolicy {
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	if !roots.AppendCertsFromPEM(f.EKRootPEM) || !inter.AppendCertsFromPEM(f.EKIntermediatePEM) {
		t.Fatal("fixture CA does not parse")
	}
	return attest.EKPolicy{Roots: roots, Intermediates: inter}
}

func TestEKPolicy(t *testing.T) {
	f := fixture(t)
	now := time.Now()
	ek, err := attest.ParseEK(f.EKCertificate, nil)
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := x509.MarshalPKIXPublicKey(ek.Public)
	sum := sha256.Sum256(pub)
	if ek.Hash != hex.EncodeToString(sum[:]) {
		t.Fatalf("EK hash %s is not the SHA-256 of its PKIX DER", ek.Hash)
	}
	good := ekPolicy(t, f)
	if err := good.Admit(ek, now); err != nil || ek.Method != attest.EKByCertificate {
		t.Fatalf("Admit with the right roots = %v (%s)", err, ek.Method)
	}
	noInter := attest.EKPolicy{Roots: good.Roots, TrustOnFirstUse: true}
	if err := noInter.Admit(ek, now); !errors.Is(err, attest.ErrEKChain) {
		t.Fatalf("Admit with a broken chain = %v, want ErrEKChain even in TOFU mode", err)
	}
	allowed := attest.EKPolicy{Roots: good.Roots, Allowed: map[string]bool{ek.Hash: true}}
	if err := allowed.Admit(ek, now); err != nil || ek.Method != attest.EKByAllowList {
		t.Fatalf("Admit of an allow-listed EK = %v (%s)", err, ek.Method)
	}
	bare, err := attest.ParseEK(nil, pub)
	if err != nil {
		t.Fatal(err)
	}
	if err := good.Admit(bare, now); !errors.Is(err, attest.ErrEKNotAllowed) {
		t.Fatalf("Admit of a bare EK = %v, want ErrEKNotAllowed", err)
	}
	if err := (attest.EKPolicy{TrustOnFirstUse: true}).Admit(bare, now); err != nil || bare.Method != attest.EKByTOFU {
		t.Fatalf("TOFU Admit = %v (%s)", err, bare.Method)
	}
	if err := (attest.EKPolicy{}).Admit(bare, now); !errors.Is(err, attest.ErrEKNotAllowed) {
		t.Fatalf("zero policy Admit = %v, want ErrEKNotAllowed", err)
	}
	if _, err := attest.ParseEK(nil, nil); !errors.Is(err, attest.ErrEKMalformed) {
		t.Fatalf("ParseEK of nothing = %v", err)
	}
}

func TestChallenge(t *testing.T) {
	f := fixture(t)
	ek, _ := attest.ParseEK(f.EKCertificate, nil)
	ak := goattest.AttestationParameters{Public: f.AKPublic, CreateData: f.AKCreateData, CreateAttestation: f.AKCreateAttestation, CreateSignature: f.AKCreateSignature}
	secret, ec, err := attest.Challenge(ek, ak, rand.Reader)
	if err != nil || len(ec.Credential) == 0 {
		t.Fatalf("Challenge: %v", err)
	}
	if err := attest.CheckActivation(secret, secret); err != nil {
		t.Fatal(err)
	}
	if err := attest.CheckActivation(secret, make([]byte, len(secret))); !errors.Is(err, attest.ErrActivation) {
		t.Fatalf("wrong answer = %v", err)
	}
	ak.CreateSignature = bytes.Clone(ak.CreateSignature)
	ak.CreateSignature[len(ak.CreateSignature)-1] ^= 1
	if _, _, err := attest.Challenge(ek, ak, rand.Reader); !errors.Is(err, attest.ErrAKMalformed) {
		t.Fatalf("Challenge of a forged AK = %v, want ErrAKMalformed", err)
	}
}

func TestEvaluate(t *testing.T) {
	v, err := attest.Verify(evidence(fixture(t)))
	if err != nil {
		t.Fatal(err)
	}
	ok := attest.Policy{Name: "ok",
		PCRs:   []attest.PCRRule{{Index: 7, Values: [][]byte{v.PCRs[7]}}},
		Claims: []attest.ClaimRule{{Name: claims.SecureBoot, Values: []string{"enabled"}}, {Name: claims.TalosVersion}}}
	if out := attest.Evaluate(v, ok); !out.Passed() || len(out.Findings) != 0 {
		t.Fatalf("matching policy: %v", out.Findings)
	}
	warn := attest.Policy{Name: "warn", Claims: []attest.ClaimRule{{Name: claims.Lockdown, Values: []string{"confidentiality"}, Mode: attest.Warn}}}
	if out := attest.Evaluate(v, ok, warn); !out.Passed() || len(out.Of(attest.Warn)) != 1 {
		t.Fatalf("warn policy: %v", out.Findings)
	}
	bad := attest.Policy{Name: "bad",
		PCRs:   []attest.PCRRule{{Index: 0, Values: [][]byte{make([]byte, 32)}, Mode: attest.Enforce}},
		Claims: []attest.ClaimRule{{Name: "absent", Mode: "typo"}}}
	out := attest.Evaluate(v, bad)
	if out.Passed() || len(out.Of(attest.Enforce)) != 2 {
		t.Fatalf("violating policy (an unknown mode enforces): %v", out.Findings)
	}
}

// BenchmarkThroughput measures, in one run, the daemon's work per
// attestation (verify the quote, replay the log, evaluate a policy) on one
// core, and per enrollment (parse and admit the EK by its certificate chain,
// check the AK, make and check the activation challenge).
func BenchmarkThroughput(b *testing.B) {
	f := fixture(b)
	e := evidence(f)
	pol := attest.Policy{Name: "bench", PCRs: []attest.PCRRule{{Index: 7, Values: [][]byte{f.PCRs[7]}}},
		Claims: []attest.ClaimRule{{Name: claims.SecureBoot, Values: []string{"enabled"}}}}
	ekp := ekPolicy(b, f)
	ak := goattest.AttestationParameters{Public: f.AKPublic, CreateData: f.AKCreateData, CreateAttestation: f.AKCreateAttestation, CreateSignature: f.AKCreateSignature}
	const rounds = 200
	b.ResetTimer()
	var verifyTime, enrollTime time.Duration
	for range b.N {
		start := time.Now()
		for range rounds {
			v, err := attest.Verify(e)
			if err != nil || !attest.Evaluate(v, pol).Passed() {
				b.Fatal(err)
			}
		}
		verifyTime += time.Since(start)
		start = time.Now()
		for range rounds {
			ek, err := attest.ParseEK(f.EKCertificate, nil)
			if err != nil {
				b.Fatal(err)
			}
			if err := ekp.Admit(ek, start); err != nil {
				b.Fatal(err)
			}
			secret, _, err := attest.Challenge(ek, ak, rand.Reader)
			if err != nil {
				b.Fatal(err)
			}
			if err := attest.CheckActivation(secret, secret); err != nil {
				b.Fatal(err)
			}
		}
		enrollTime += time.Since(start)
	}
	n := float64(b.N * rounds)
	b.ReportMetric(n/verifyTime.Seconds(), "verifications/s/core")
	b.ReportMetric(n/enrollTime.Seconds(), "enrollments/s/core")
}
