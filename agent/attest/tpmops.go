package attest

import (
	"crypto/x509"
	"errors"
	"fmt"
	"slices"

	"github.com/google/go-attestation/attest"

	"github.com/sovra-dev/sovra/internal/nodeapi"
)

// QuotedPCRs are the PCRs the agent quotes, from the SHA-256 bank.
var QuotedPCRs = []int{0, 1, 2, 3, 4, 5, 6, 7, 11}

// Key is an AK made in the TPM: its creation parameters and its sealed blob,
// which only that TPM can load. Key holds no secret usable off the TPM.
type Key struct {
	// EKCertificate is the DER of the EK certificate, nil when the TPM has none.
	EKCertificate []byte
	// EKPublic is the PKIX DER of the EK public key.
	EKPublic []byte
	// Params are the AK's creation parameters.
	Params attest.AttestationParameters
	// Blob is the AK as go-attestation marshals it (TPM-wrapped).
	Blob []byte
}

// NewKey reads the TPM's EK (its certificate when it has one) and makes a
// fresh AK under the storage root key.
func NewKey(t TPM) (*Key, error) {
	tpm, err := openTPM(t)
	if err != nil {
		return nil, err
	}
	defer tpm.Close()
	eks, err := tpm.EKs()
	if err != nil {
		return nil, fmt.Errorf("reading EK: %w", err)
	}
	if len(eks) == 0 {
		return nil, errors.New("reading EK: the TPM reports none")
	}
	ek := eks[0]
	var k Key
	if ek.Certificate != nil {
		k.EKCertificate = ek.Certificate.Raw
	}
	if k.EKPublic, err = x509.MarshalPKIXPublicKey(ek.Public); err != nil {
		return nil, fmt.Errorf("encoding EK public key: %w", err)
	}
	ak, err := tpm.NewAK(nil)
	if err != nil {
		return nil, fmt.Errorf("creating AK: %w", err)
	}
	defer ak.Close(tpm)
	k.Params = ak.AttestationParameters()
	if k.Blob, err = ak.Marshal(); err != nil {
		return nil, fmt.Errorf("encoding AK: %w", err)
	}
	return &k, nil
}

// Activate answers a credential-activation challenge with the TPM's EK and AK.
func (k *Key) Activate(t TPM, c *nodeapi.ActivationChallenge) ([]byte, error) {
	var secret []byte
	err := k.withAK(t, func(tpm *attest.TPM, ak *attest.AK) error {
		var err error
		secret, err = ak.ActivateCredential(tpm, attest.EncryptedCredential{Credential: c.GetCredential(), Secret: c.GetSecret()})
		if err != nil {
			return fmt.Errorf("activating credential: %w", err)
		}
		return nil
	})
	return secret, err
}

// withAK opens the TPM, loads the key's AK into it and runs fn with both,
// closing them afterwards.
func (k *Key) withAK(t TPM, fn func(*attest.TPM, *attest.AK) error) error {
	tpm, err := openTPM(t)
	if err != nil {
		return err
	}
	defer tpm.Close()
	ak, err := tpm.LoadAK(k.Blob)
	if err != nil {
		return fmt.Errorf("loading AK: %w", err)
	}
	defer ak.Close(tpm)
	return fn(tpm, ak)
}

// Quote is a TPM quote with the PCR values it covers.
type Quote struct {
	Quote, Signature []byte
	// Hash is the TPM_ALG_ID of the PCR bank.
	Hash uint16
	PCRs map[int][]byte
}

// Quote quotes pcrs from bank alg with extraData. Agents pass QuotedPCRs and
// attest.HashSHA256; other values exist for tests of the daemon's checks.
func (k *Key) Quote(t TPM, extraData []byte, alg attest.HashAlg, pcrs []int) (*Quote, error) {
	var out *Quote
	err := k.withAK(t, func(tpm *attest.TPM, ak *attest.AK) error {
		q, err := ak.QuotePCRs(tpm, extraData, alg, pcrs)
		if err != nil {
			return fmt.Errorf("quoting PCRs: %w", err)
		}
		all, err := tpm.PCRs(alg)
		if err != nil {
			return fmt.Errorf("reading PCRs: %w", err)
		}
		out = &Quote{Quote: q.Quote, Signature: q.Signature, Hash: uint16(alg), PCRs: map[int][]byte{}}
		for _, p := range all {
			if slices.Contains(pcrs, p.Index) {
				out.PCRs[p.Index] = p.Digest
			}
		}
		return nil
	})
	return out, err
}

// Begin is the first enrollment message for this key.
func (k *Key) Begin(uuid, hostname string, addresses []string) *nodeapi.EnrollBegin {
	b := &nodeapi.EnrollBegin{
		Ak: &nodeapi.AttestationKey{
			Public:            k.Params.Public,
			CreateData:        k.Params.CreateData,
			CreateAttestation: k.Params.CreateAttestation,
			CreateSignature:   k.Params.CreateSignature,
		},
		Uuid:      uuid,
		Hostname:  hostname,
		Addresses: addresses,
	}
	if k.EKCertificate != nil {
		b.EkCertificate = k.EKCertificate
	} else {
		b.EkPublic = k.EKPublic
	}
	return b
}
