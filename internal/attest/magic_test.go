package attest_test

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"testing"

	"github.com/google/go-tpm/legacy/tpm2"

	"github.com/sovra-dev/sovra/internal/attest"
	"github.com/sovra-dev/sovra/internal/claims"
)

// softwareQuote signs a quote over the fixture's PCRs with a software key
// that is pinned as if it were the AK, with the given magic.
func softwareQuote(t *testing.T, magic uint32) attest.Evidence {
	t.Helper()
	f := fixture(t)
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := tpm2.Public{
		Type: tpm2.AlgRSA, NameAlg: tpm2.AlgSHA256, Attributes: tpm2.FlagSignerDefault,
		RSAParameters: &tpm2.RSAParams{Sign: &tpm2.SigScheme{Alg: tpm2.AlgRSASSA, Hash: tpm2.AlgSHA256}, KeyBits: 2048, ModulusRaw: key.N.Bytes()},
	}.Encode()
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	for _, i := range attest.QuotedPCRs {
		h.Write(f.PCRs[i])
	}
	q, err := tpm2.AttestationData{
		Magic: magic, Type: tpm2.TagAttestQuote, QualifiedSigner: tpm2.Name{Digest: &tpm2.HashValue{Alg: tpm2.AlgSHA256, Value: make([]byte, 32)}},
		ExtraData: claims.ExtraData(f.Nonce, f.Claims),
		AttestedQuoteInfo: &tpm2.QuoteInfo{
			PCRSelection: tpm2.PCRSelection{Hash: tpm2.AlgSHA256, PCRs: attest.QuotedPCRs},
			PCRDigest:    h.Sum(nil),
		},
	}.Encode()
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256(q)
	sig, _ := rsa.SignPKCS1v15(rand.Reader, key, crypto.SHA256, d[:])
	sigEnc, _ := tpm2.Signature{Alg: tpm2.AlgRSASSA, RSA: &tpm2.SignatureRSA{HashAlg: tpm2.AlgSHA256, Signature: sig}}.Encode()
	e := evidence(f)
	e.AKPublic, e.Quote, e.Signature = pub, q, sigEnc
	return e
}

// TestMagicIsChecked: a structure the TPM did not generate is refused even
// when its signature verifies (a key that signs anything could make it).
func TestMagicIsChecked(t *testing.T) {
	if _, err := attest.Verify(softwareQuote(t, 0x01020304)); !errors.Is(err, attest.ErrNotGenerated) {
		t.Fatalf("Verify of a quote without TPM_GENERATED = %v, want ErrNotGenerated", err)
	}
	// With the magic, only the pinned AK stands between a software key and
	// a pass: which is why the AK is pinned only after credential activation.
	if _, err := attest.Verify(softwareQuote(t, 0xff544347)); err != nil {
		t.Fatalf("control: %v", err)
	}
}
