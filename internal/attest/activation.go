package attest

import (
	"crypto/subtle"
	"errors"
	"fmt"
	"io"

	"github.com/google/go-attestation/attest"
)

// MaxAKParamLen bounds each AK creation structure a node sends.
const MaxAKParamLen = 2048

// Sentinel errors of credential activation.
var (
	ErrAKMalformed = errors.New("AK parameters are not those of a TPM-resident restricted signing key")
	ErrActivation  = errors.New("credential activation failed: the AK is not resident in the TPM of this EK")
)

// Challenge checks that ak describes a restricted, TPM-generated signing key
// and makes a credential-activation challenge that only the TPM holding both
// ek and ak can answer. The caller keeps secret and never sends it.
func Challenge(ek *EK, ak attest.AttestationParameters, rand io.Reader) (secret []byte, ec *attest.EncryptedCredential, err error) {
	for name, b := range map[string][]byte{
		"public": ak.Public, "creation data": ak.CreateData,
		"creation attestation": ak.CreateAttestation, "creation signature": ak.CreateSignature,
	} {
		if len(b) == 0 || len(b) > MaxAKParamLen {
			return nil, nil, fmt.Errorf("%w: %s of %d bytes, want 1 to %d", ErrAKMalformed, name, len(b), MaxAKParamLen)
		}
	}
	ak.UseTCSDActivationFormat = false
	p := attest.ActivationParameters{EK: ek.Public, AK: ak, Rand: rand}
	if err := p.CheckAKParameters(); err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrAKMalformed, err)
	}
	secret, ec, err = p.Generate()
	if err != nil {
		return nil, nil, fmt.Errorf("generating activation challenge: %w", err)
	}
	return secret, ec, nil
}

// CheckActivation compares the node's answer with the secret in constant time.
func CheckActivation(secret, answer []byte) error {
	if len(answer) != len(secret) || subtle.ConstantTimeCompare(secret, answer) != 1 {
		return ErrActivation
	}
	return nil
}
