package custody

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// Blob layout and limits.
const (
	// BlobVersion is the format version byte of the blobs this package seals.
	BlobVersion byte = 1
	// SaltSize is the size of a node's key salt.
	SaltSize = 32
	// MaxData is the most data one blob may hold (Talos seals 32 bytes).
	MaxData = 512
	// HeaderSize is version, key id and nonce.
	HeaderSize = 1 + keyIDSize + nonceSize
	// Overhead is what a blob adds to its data.
	Overhead = HeaderSize + tagSize
	// MaxBlob is the size of the largest valid blob.
	MaxBlob = MaxData + Overhead

	keyIDSize = 4
	nonceSize = 12
	tagSize   = 16
	kekSize   = 32
	// kekInfo binds derived keys to their purpose.
	kekInfo = "sovra.dev/kms key-encryption key v1"
)

// Sentinel errors; none of them carries key material.
var (
	// ErrMalformed: the blob is truncated, too long or of an unknown format.
	ErrMalformed = errors.New("sealed blob is malformed")
	// ErrUnknownKey: the blob names a master key version the keyring lacks.
	ErrUnknownKey = errors.New("sealed blob names an unknown master key version")
	// ErrOpen: authentication failed: another node's blob, another salt (a
	// revoked and re-created node), a tampered blob or another master key.
	ErrOpen = errors.New("sealed blob does not open for this node")
	// ErrSalt: the node's salt is missing or not SaltSize bytes.
	ErrSalt = errors.New("node key salt is missing or malformed")
	// ErrData: the data to seal is empty or larger than MaxData.
	ErrData = errors.New("data to seal must be 1 to 512 bytes")
)

// NewSalt returns a fresh random salt for a node record.
func NewSalt() ([]byte, error) {
	s := make([]byte, SaltSize)
	if _, err := rand.Read(s); err != nil {
		return nil, fmt.Errorf("generating node key salt: %w", err)
	}
	return s, nil
}

// Seal encrypts data for the node uuid whose record holds salt, with the
// keyring's current version.
func (k *Keyring) Seal(salt []byte, uuid string, data []byte) ([]byte, error) {
	if len(data) == 0 || len(data) > MaxData {
		return nil, ErrData
	}
	id := k.current
	aead, err := k.aead(id, salt)
	if err != nil {
		return nil, err
	}
	out := make([]byte, HeaderSize, HeaderSize+len(data)+tagSize)
	out[0] = BlobVersion
	binary.BigEndian.PutUint32(out[1:], id)
	nonce := out[1+keyIDSize : HeaderSize]
	if _, err := rand.Read(nonce); err != nil {
		return nil, fmt.Errorf("generating nonce: %w", err)
	}
	return aead.Seal(out, nonce, data, aad(uuid, id)), nil
}

// Open decrypts a blob sealed for the node uuid whose record holds salt.
func (k *Keyring) Open(salt []byte, uuid string, blob []byte) ([]byte, error) {
	id, err := ParseHeader(blob)
	if err != nil {
		return nil, err
	}
	aead, err := k.aead(id, salt)
	if err != nil {
		return nil, err
	}
	data, err := aead.Open(nil, blob[1+keyIDSize:HeaderSize], blob[HeaderSize:], aad(uuid, id))
	if err != nil {
		return nil, ErrOpen
	}
	return data, nil
}

// ParseHeader checks a blob's framing strictly and returns its key id.
func ParseHeader(blob []byte) (uint32, error) {
	switch {
	case len(blob) == 0:
		return 0, fmt.Errorf("%w: empty", ErrMalformed)
	case blob[0] != BlobVersion:
		return 0, fmt.Errorf("%w: format version %d, want %d", ErrMalformed, blob[0], BlobVersion)
	case len(blob) < Overhead+1:
		return 0, fmt.Errorf("%w: %d bytes, at least %d", ErrMalformed, len(blob), Overhead+1)
	case len(blob) > MaxBlob:
		return 0, fmt.Errorf("%w: %d bytes, at most %d", ErrMalformed, len(blob), MaxBlob)
	}
	id := binary.BigEndian.Uint32(blob[1:])
	if id == 0 {
		return 0, fmt.Errorf("%w: key version 0", ErrMalformed)
	}
	return id, nil
}

// aead derives the node's KEK for master version id and returns its cipher.
func (k *Keyring) aead(id uint32, salt []byte) (cipher.AEAD, error) {
	if len(salt) != SaltSize {
		return nil, ErrSalt
	}
	master, ok := k.key(id)
	if !ok {
		return nil, fmt.Errorf("%w: version %d", ErrUnknownKey, id)
	}
	kek, err := hkdf.Key(sha256.New, master, salt, kekInfo, kekSize)
	if err != nil {
		return nil, fmt.Errorf("deriving key-encryption key: %w", err)
	}
	block, err := aes.NewCipher(kek)
	clear(kek)
	if err != nil {
		return nil, fmt.Errorf("creating cipher: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("creating cipher: %w", err)
	}
	return aead, nil
}

// aad is the node uuid followed by the big-endian key id.
func aad(uuid string, id uint32) []byte {
	b := make([]byte, 0, len(uuid)+keyIDSize)
	b = append(b, uuid...)
	return binary.BigEndian.AppendUint32(b, id)
}

// Volume keys.
const (
	// VolumeKeySize is the size of a volume key.
	VolumeKeySize = 32
	// volumeKeyInfo binds derived volume keys to their purpose.
	volumeKeyInfo = "sovra.dev/volume-key v1"
)

// VolumeKey derives the key of volume volumeID of the node uuid whose
// record holds salt, from master key version (0: the current one), and
// returns it with the version used. Nothing is stored: the same inputs give
// the same key, and without the salt (a deleted record) the key is gone.
func (k *Keyring) VolumeKey(version uint32, salt []byte, uuid, volumeID string) ([]byte, uint32, error) {
	if len(salt) != SaltSize {
		return nil, 0, ErrSalt
	}
	if version == 0 {
		version = k.current
	}
	master, ok := k.key(version)
	if !ok {
		return nil, 0, fmt.Errorf("%w: version %d", ErrUnknownKey, version)
	}
	info := volumeKeyInfo + "\x00" + uuid + "\x00" + volumeID
	key, err := hkdf.Key(sha256.New, master, salt, info, VolumeKeySize)
	if err != nil {
		return nil, 0, fmt.Errorf("deriving volume key: %w", err)
	}
	return key, version, nil
}
