// Package volumes encrypts and unlocks the data volumes the agent manages
// itself (raw partitions given to it, as LUKS2). A volume's key comes from
// the daemon over the authenticated node channel, only after a passing
// attestation of this boot; it lives in memory only, is handed to
// cryptsetup on a pipe, and is wiped after use.
package volumes

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"time"

	"github.com/siderolabs/go-blockdevice/v2/encryption"
	"github.com/siderolabs/go-blockdevice/v2/encryption/luks"
	"go.uber.org/zap"
)

const (
	// keySlot is the LUKS2 key slot (and token) the agent uses.
	keySlot = 0
	// TokenType names the LUKS2 token that records which master key
	// version the volume's key derives from. It holds no secret.
	TokenType = "sovra-volume-key"
	// DefaultPBKDFMemory (KiB) and DefaultIterTime bound the key slot's
	// argon2id: the key is 256 random bits, so the KDF need not be slow.
	DefaultPBKDFMemory = 64 << 10
	DefaultIterTime    = 200 * time.Millisecond
)

// luksMagic starts every LUKS header.
var luksMagic = []byte{'L', 'U', 'K', 'S', 0xba, 0xbe}

// volumeIDPattern is what the daemon accepts as a volume ID.
var volumeIDPattern = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// Sentinel errors.
var (
	// ErrKeyRejected: the volume's LUKS2 header does not take the key.
	ErrKeyRejected = errors.New("the volume does not open with the key the daemon released")
	// ErrInvalidVolume: the volume ID or device is not usable.
	ErrInvalidVolume = errors.New("invalid volume")
)

// KeySource releases volume keys; the implementation talks to the daemon
// over mutual TLS with the node credential of this boot's attestation.
type KeySource interface {
	// VolumeKey returns the key of volume id derived from master key
	// version (0: the newest) and the version it derives from.
	VolumeKey(ctx context.Context, id string, version uint32) (key []byte, used uint32, err error)
}

// Volume is a data volume the agent manages.
type Volume struct {
	// ID names the volume to the daemon (e.g. its partition label).
	ID string
	// Device is the raw partition (or, in tests, a file).
	Device string
}

// Outcome is what Prepare did.
type Outcome string

// Outcomes.
const (
	// Formatted: the volume had no LUKS header and was formatted.
	Formatted Outcome = "formatted"
	// Verified: the volume's LUKS2 header took the key.
	Verified Outcome = "verified"
	// Opened: the volume was opened at /dev/mapper/<name>.
	Opened Outcome = "opened"
)

// Manager formats, checks and opens volumes with keys from Keys.
type Manager struct {
	// Keys releases volume keys.
	Keys KeySource
	// PBKDFMemory (KiB) and IterTime tune the key slot; zero means the
	// defaults above.
	PBKDFMemory uint64
	IterTime    time.Duration
	// Logger logs one line per volume decision; nil discards.
	Logger *zap.Logger
}

// versionToken is the LUKS2 token's user data.
type versionToken struct {
	VolumeID   string `json:"volumeId"`
	KeyVersion uint32 `json:"keyVersion"`
}

// Prepare formats v on first use (no LUKS header), recording the key's
// master key version in a token, or else checks that its header takes the
// key. With mapped non-empty it then opens the volume at /dev/mapper/mapped
// and returns that path.
func (m *Manager) Prepare(ctx context.Context, v Volume, mapped string) (Outcome, string, error) {
	if !volumeIDPattern.MatchString(v.ID) || v.Device == "" {
		return "", "", fmt.Errorf("%w: ID %q, device %q", ErrInvalidVolume, v.ID, v.Device)
	}
	formatted, err := isLUKS(v.Device)
	if err != nil {
		return "", "", err
	}
	l := m.luks()
	outcome := Verified
	var version uint32
	if formatted {
		var tok luks.Token[*versionToken]
		switch err := l.ReadToken(ctx, v.Device, keySlot, &tok); {
		case errors.Is(err, encryption.ErrTokenNotFound):
			return "", "", fmt.Errorf("%w: volume %s has a LUKS header the agent did not write", ErrInvalidVolume, v.ID)
		case err != nil:
			return "", "", fmt.Errorf("reading the key version of volume %s: %w", v.ID, err)
		}
		if tok.Type != TokenType || tok.UserData == nil || tok.UserData.VolumeID != v.ID || tok.UserData.KeyVersion == 0 {
			return "", "", fmt.Errorf("%w: volume %s has a LUKS header the agent did not write", ErrInvalidVolume, v.ID)
		}
		version = tok.UserData.KeyVersion
	}
	key, used, err := m.Keys.VolumeKey(ctx, v.ID, version)
	if err != nil {
		return "", "", fmt.Errorf("fetching the key of volume %s: %w", v.ID, err)
	}
	defer clear(key)
	k := encryption.NewKey(keySlot, key)
	if !formatted {
		if err := l.Encrypt(ctx, v.Device, k); err != nil {
			return "", "", fmt.Errorf("formatting volume %s: %w", v.ID, err)
		}
		tok := &luks.Token[*versionToken]{Type: TokenType, UserData: &versionToken{VolumeID: v.ID, KeyVersion: used}}
		if err := l.SetToken(ctx, v.Device, keySlot, tok); err != nil {
			return "", "", fmt.Errorf("recording the key version of volume %s: %w", v.ID, err)
		}
		outcome = Formatted
	}
	ok, err := l.CheckKey(ctx, v.Device, k)
	if err != nil {
		return "", "", fmt.Errorf("checking the key of volume %s: %w", v.ID, err)
	}
	if !ok {
		return "", "", fmt.Errorf("volume %s: %w", v.ID, ErrKeyRejected)
	}
	path := ""
	if mapped != "" {
		if path, err = l.Open(ctx, v.Device, mapped, k); err != nil {
			return "", "", fmt.Errorf("opening volume %s: %w", v.ID, err)
		}
		outcome = Opened
	}
	m.logger().Info("volume ready", zap.String("volume", v.ID), zap.String("device", v.Device),
		zap.String("outcome", string(outcome)), zap.Uint32("key_version", used))
	return outcome, path, nil
}

func (m *Manager) luks() *luks.LUKS {
	mem, iter := m.PBKDFMemory, m.IterTime
	if mem == 0 {
		mem = DefaultPBKDFMemory
	}
	if iter == 0 {
		iter = DefaultIterTime
	}
	return luks.New(luks.AESXTSPlain64Cipher, luks.WithPBKDFMemory(mem), luks.WithIterTime(iter))
}

func (m *Manager) logger() *zap.Logger {
	if m.Logger == nil {
		return zap.NewNop()
	}
	return m.Logger
}

// isLUKS reports whether the device starts with a LUKS header.
func isLUKS(device string) (bool, error) {
	f, err := os.Open(device)
	if err != nil {
		return false, fmt.Errorf("%w: %w", ErrInvalidVolume, err)
	}
	defer f.Close()
	head := make([]byte, len(luksMagic))
	if _, err := io.ReadFull(f, head); err != nil {
		return false, fmt.Errorf("%w: reading %s: %w", ErrInvalidVolume, device, err)
	}
	return bytes.Equal(head, luksMagic), nil
}
