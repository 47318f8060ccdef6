package attest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/google/go-attestation/attest"
)

// Limits on EK input.
const (
	// MaxEKCertLen bounds an EK certificate (NV indices hold at most a few KiB).
	MaxEKCertLen = 4096
	// MaxEKPublicLen bounds a PKIX EK public key.
	MaxEKPublicLen = 1024
	// minEKRSABits is the smallest EK RSA modulus accepted.
	minEKRSABits = 2048
)

// How an EK was admitted.
const (
	EKByCertificate = "Certificate"
	EKByAllowList   = "AllowList"
	EKByTOFU        = "TrustOnFirstUse"
)

// Sentinel errors of EK checks.
var (
	ErrEKMalformed  = errors.New("malformed EK")
	ErrEKChain      = errors.New("EK certificate does not chain to a configured manufacturer root")
	ErrEKNotAllowed = errors.New("EK is not allowed by the enrollment policy")
)

// oidSubjectAltName is marked critical in EK certificates whose subject is
// empty (TCG EK Credential Profile); Go does not process the TPM directory
// names in it, which is fine: the chain, not the name, is what we check.
var oidSubjectAltName = asn1.ObjectIdentifier{2, 5, 29, 17}

// EKPolicy says which EKs may enroll. The zero value admits nothing.
type EKPolicy struct {
	// Roots are the TPM manufacturers' root CAs; nil checks no chains.
	Roots *x509.CertPool
	// Intermediates help build chains; nil means none.
	Intermediates *x509.CertPool
	// Allowed holds hex SHA-256 hashes (see EKHash) of EK public keys that
	// may enroll whatever their certificate.
	Allowed map[string]bool
	// TrustOnFirstUse admits any EK that presents no certificate, or one when
	// no roots are configured. For labs only.
	TrustOnFirstUse bool
}

// EK is an admitted endorsement key.
type EK struct {
	Public      crypto.PublicKey
	Certificate *x509.Certificate
	// Hash is the hex SHA-256 of the PKIX DER of Public: the node's identity.
	Hash string
	// Method is one of EKByCertificate, EKByAllowList, EKByTOFU.
	Method string
}

// ParseEK reads the EK a node sent: a DER certificate, or else a PKIX public key.
func ParseEK(certDER, publicDER []byte) (*EK, error) {
	var ek EK
	switch {
	case len(certDER) > 0:
		if len(certDER) > MaxEKCertLen {
			return nil, fmt.Errorf("%w: certificate of %d bytes, at most %d", ErrEKMalformed, len(certDER), MaxEKCertLen)
		}
		cert, err := attest.ParseEKCertificate(certDER)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrEKMalformed, err)
		}
		ek.Certificate, ek.Public = cert, cert.PublicKey
	case len(publicDER) > 0:
		if len(publicDER) > MaxEKPublicLen {
			return nil, fmt.Errorf("%w: public key of %d bytes, at most %d", ErrEKMalformed, len(publicDER), MaxEKPublicLen)
		}
		pub, err := x509.ParsePKIXPublicKey(publicDER)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrEKMalformed, err)
		}
		ek.Public = pub
	default:
		return nil, fmt.Errorf("%w: neither certificate nor public key sent", ErrEKMalformed)
	}
	switch pub := ek.Public.(type) {
	case *rsa.PublicKey:
		if pub.N.BitLen() < minEKRSABits {
			return nil, fmt.Errorf("%w: RSA key of %d bits, at least %d", ErrEKMalformed, pub.N.BitLen(), minEKRSABits)
		}
	case *ecdsa.PublicKey:
	default:
		return nil, fmt.Errorf("%w: key of type %T", ErrEKMalformed, pub)
	}
	h, err := EKHash(ek.Public)
	if err != nil {
		return nil, err
	}
	ek.Hash = h
	return &ek, nil
}

// EKHash is the hex SHA-256 of the PKIX DER of an EK public key.
func EKHash(pub crypto.PublicKey) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", fmt.Errorf("%w: marshalling public key: %v", ErrEKMalformed, err)
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:]), nil
}

// Admit decides whether ek may enroll at time now, and records how in
// ek.Method. The order is: allow-listed hash; certificate chain to the roots
// (a certificate that fails its chain is refused even in TOFU mode when roots
// are configured); trust on first use.
func (p EKPolicy) Admit(ek *EK, now time.Time) error {
	if p.Allowed[ek.Hash] {
		ek.Method = EKByAllowList
		return nil
	}
	if ek.Certificate != nil && p.Roots != nil {
		cert := *ek.Certificate
		cert.UnhandledCriticalExtensions = slices.DeleteFunc(slices.Clone(cert.UnhandledCriticalExtensions),
			func(o asn1.ObjectIdentifier) bool { return o.Equal(oidSubjectAltName) })
		_, err := cert.Verify(x509.VerifyOptions{
			Roots:         p.Roots,
			Intermediates: p.Intermediates,
			CurrentTime:   now,
			KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
		})
		if err != nil {
			return fmt.Errorf("%w: %v", ErrEKChain, err)
		}
		ek.Method = EKByCertificate
		return nil
	}
	if p.TrustOnFirstUse {
		ek.Method = EKByTOFU
		return nil
	}
	return fmt.Errorf("%w: EK %s is not allow-listed and has no certificate chain to check", ErrEKNotAllowed, ek.Hash)
}
