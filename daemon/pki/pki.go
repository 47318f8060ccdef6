// Package pki creates, on first start, and reuses on every later start the
// daemon's key material in its data directory: the cluster CA, the API serving
// certificate, the service-account signing key, the admin client certificate
// and kubeconfig, and the key that encrypts Secrets at rest.
package pki

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// File names in the data directory.
const (
	CACert      = "ca.crt"
	CAKey       = "ca.key"
	ServingCert = "apiserver.crt"
	ServingKey  = "apiserver.key"
	SAKey       = "sa.key"
	SAPub       = "sa.pub"
	AdminCert   = "admin.crt"
	AdminKey    = "admin.key"
)

const (
	caValidity      = 10 * 365 * 24 * time.Hour
	leafValidity    = 365 * 24 * time.Hour
	renewBefore     = 30 * 24 * time.Hour
	clockSkewMargin = 5 * time.Minute

	privateFileMode = 0o600
	publicFileMode  = 0o644

	// AdminUser and AdminGroup name the admin client certificate's subject.
	AdminUser  = "sovra-admin"
	AdminGroup = "system:masters"
)

// CA is a certificate authority that signs the daemon's certificates.
type CA struct {
	Cert *x509.Certificate
	Key  crypto.Signer
	// PEM is the CA certificate, PEM-encoded, as clients need it.
	PEM []byte
}

// EnsureCA loads the CA from ca.crt and ca.key in dir, or creates it when
// neither file exists. One file without the other is an error: nothing is
// overwritten.
func EnsureCA(dir, commonName string) (*CA, error) {
	return EnsureCAFiles(filepath.Join(dir, CACert), filepath.Join(dir, CAKey), commonName)
}

// EnsureCAFiles is EnsureCA with the certificate and key paths given.
func EnsureCAFiles(certPath, keyPath, commonName string) (*CA, error) {
	certPEM, key, err := loadPair(certPath, keyPath)
	if err == nil {
		cert, err := parseCert(certPEM)
		if err != nil {
			return nil, fmt.Errorf("loading CA %s: %w", certPath, err)
		}
		return &CA{Cert: cert, Key: key, PEM: certPEM}, nil
	}
	if !errors.Is(err, errNoPair) {
		return nil, fmt.Errorf("loading CA: %w", err)
	}
	key, err = newKey()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: commonName},
		NotBefore:             time.Now().Add(-clockSkewMargin),
		NotAfter:              time.Now().Add(caValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := sign(tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("creating CA: %w", err)
	}
	certPEM = encodeCert(der)
	if err := writePair(certPath, keyPath, certPEM, key); err != nil {
		return nil, err
	}
	cert, _ := x509.ParseCertificate(der)
	return &CA{Cert: cert, Key: key, PEM: certPEM}, nil
}

// Leaf describes a certificate the CA issues.
type Leaf struct {
	CommonName   string
	Organization []string
	DNSNames     []string
	IPs          []net.IP
	Usage        []x509.ExtKeyUsage
}

// Add adds name to the leaf's IPs when it is an IP address, else to its
// DNS names, unless the leaf names it already.
func (l *Leaf) Add(name string) {
	if ip := net.ParseIP(name); ip != nil {
		if !slices.ContainsFunc(l.IPs, ip.Equal) {
			l.IPs = append(l.IPs, ip)
		}
		return
	}
	if !slices.Contains(l.DNSNames, name) {
		l.DNSNames = append(l.DNSNames, name)
	}
}

// EnsureLeaf loads the certificate at certPath/keyPath, or issues a new one
// when it is missing, not signed by ca, expiring within 30 days, or does not
// cover every name in want. The key is kept when the certificate is reissued.
// It reports whether it wrote a new certificate.
func (ca *CA) EnsureLeaf(certPath, keyPath string, want Leaf) (bool, error) {
	certPEM, key, err := loadPair(certPath, keyPath)
	switch {
	case err == nil:
		if cert, err := parseCert(certPEM); err == nil && ca.covers(cert, want) {
			return false, nil
		}
	case errors.Is(err, errNoPair):
		if key, err = newKey(); err != nil {
			return false, err
		}
	default:
		return false, err
	}
	der, err := sign(leafTemplate(want), ca.Cert, key.Public(), ca.Key)
	if err != nil {
		return false, fmt.Errorf("issuing certificate %s: %w", certPath, err)
	}
	return true, writePair(certPath, keyPath, encodeCert(der), key)
}

// Issue issues a certificate for want with a fresh key, in memory: for
// credentials the daemon holds only while it runs. It returns both PEM-encoded.
func (ca *CA) Issue(want Leaf) (certPEM, keyPEM []byte, err error) {
	key, err := newKey()
	if err != nil {
		return nil, nil, err
	}
	der, err := sign(leafTemplate(want), ca.Cert, key.Public(), ca.Key)
	if err != nil {
		return nil, nil, fmt.Errorf("issuing certificate for %s: %w", want.CommonName, err)
	}
	if keyPEM, err = EncodeKey(key); err != nil {
		return nil, nil, err
	}
	return encodeCert(der), keyPEM, nil
}

func leafTemplate(want Leaf) *x509.Certificate {
	return &x509.Certificate{
		Subject:     pkix.Name{CommonName: want.CommonName, Organization: want.Organization},
		DNSNames:    want.DNSNames,
		IPAddresses: want.IPs,
		NotBefore:   time.Now().Add(-clockSkewMargin),
		NotAfter:    time.Now().Add(leafValidity),
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: want.Usage,
	}
}

// covers reports whether cert is signed by ca, valid for a while yet, and
// names everything in want.
func (ca *CA) covers(cert *x509.Certificate, want Leaf) bool {
	if cert.CheckSignatureFrom(ca.Cert) != nil || time.Until(cert.NotAfter) < renewBefore {
		return false
	}
	if cert.Subject.CommonName != want.CommonName || !slices.Equal(cert.Subject.Organization, want.Organization) {
		return false
	}
	for _, name := range want.DNSNames {
		if !slices.Contains(cert.DNSNames, name) {
			return false
		}
	}
	for _, ip := range want.IPs {
		if !slices.ContainsFunc(cert.IPAddresses, ip.Equal) {
			return false
		}
	}
	return true
}

// EnsureKey loads the private key at keyPath, or creates it with its public
// key beside it at pubPath. The service-account signing key is one: it must
// survive restarts, or every token issued before a restart stops working.
func EnsureKey(keyPath, pubPath string) error {
	data, err := os.ReadFile(keyPath)
	if err == nil {
		key, err := parseKey(data)
		if err != nil {
			return fmt.Errorf("loading key %s: %w", keyPath, err)
		}
		return writePublic(pubPath, key.Public())
	}
	if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("loading key: %w", err)
	}
	key, err := newKey()
	if err != nil {
		return err
	}
	if err := writeKey(keyPath, key); err != nil {
		return err
	}
	return writePublic(pubPath, key.Public())
}

var errNoPair = errors.New("neither certificate nor key exists")

// loadPair reads a certificate and its key. It returns errNoPair when neither
// exists, and an error naming the missing half when only one does.
func loadPair(certPath, keyPath string) ([]byte, crypto.Signer, error) {
	certPEM, certErr := os.ReadFile(certPath)
	keyPEM, keyErr := os.ReadFile(keyPath)
	switch {
	case errors.Is(certErr, os.ErrNotExist) && errors.Is(keyErr, os.ErrNotExist):
		return nil, nil, errNoPair
	case certErr != nil:
		return nil, nil, fmt.Errorf("reading %s (its key %s exists): %w", certPath, keyPath, certErr)
	case keyErr != nil:
		return nil, nil, fmt.Errorf("reading %s (its certificate %s exists): %w", keyPath, certPath, keyErr)
	}
	key, err := parseKey(keyPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("loading key %s: %w", keyPath, err)
	}
	return certPEM, key, nil
}

func newKey() (*ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating key: %w", err)
	}
	return key, nil
}

func sign(tmpl, parent *x509.Certificate, pub crypto.PublicKey, signer crypto.Signer) ([]byte, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, err
	}
	tmpl.SerialNumber = serial
	return x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
}

func parseCert(data []byte) (*x509.Certificate, error) {
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, errors.New("no PEM certificate")
	}
	return x509.ParseCertificate(block.Bytes)
}

func parseKey(data []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("no PEM key")
	}
	if k, err := x509.ParsePKCS8PrivateKey(block.Bytes); err == nil {
		if s, ok := k.(crypto.Signer); ok {
			return s, nil
		}
	}
	if k, err := x509.ParseECPrivateKey(block.Bytes); err == nil {
		return k, nil
	}
	if k, err := x509.ParsePKCS1PrivateKey(block.Bytes); err == nil {
		return k, nil
	}
	return nil, errors.New("unsupported private key")
}

func encodeCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// EncodeKey returns key as a PEM "PRIVATE KEY" (PKCS#8).
func EncodeKey(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encoding key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

func writePair(certPath, keyPath string, certPEM []byte, key crypto.Signer) error {
	if err := writeKey(keyPath, key); err != nil {
		return err
	}
	return WriteFile(certPath, certPEM, publicFileMode)
}

func writeKey(path string, key crypto.Signer) error {
	data, err := EncodeKey(key)
	if err != nil {
		return err
	}
	return WriteFile(path, data, privateFileMode)
}

func writePublic(path string, pub crypto.PublicKey) error {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return fmt.Errorf("encoding public key: %w", err)
	}
	data := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, data) {
		return nil
	}
	return WriteFile(path, data, publicFileMode)
}

// WriteFile writes data to path atomically (a temporary file renamed over
// path) with the given mode, so a crash never leaves half a key behind.
func WriteFile(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}
