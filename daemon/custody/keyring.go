// Package custody holds the daemon's key custody: the versioned master
// keyring (a 0600 file outside the datastore), the derivation of a per-node
// key-encryption key (HKDF over the master key and the node's random salt,
// which lives in the node's record), and the sealed-blob format
//
//	version (1) | key id (4, big endian) | nonce (12) | AES-256-GCM(KEK, data, aad = node uuid | key id)
//
// A blob opens only with all three parts: the blob (on the node's disk), the
// salt (in the datastore) and the master key (with the daemon). Deleting the
// node's record destroys the salt and so every key the node ever sealed.
// No error or log line of this package holds key material.
package custody

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// Keyring file format: one master key version per line, "<id> <base64 key>",
// where id is a positive decimal integer and the key is 32 bytes. Blank
// lines and lines starting with '#' are ignored. The highest id seals;
// every listed id opens. Rotation appends a line; retiring a version
// (deleting its line) kills every blob sealed with it.
const (
	// MasterKeySize is the size of a master key version in bytes.
	MasterKeySize = 32
	// KeyringFileMode is the mode keyring files are written with. A
	// keyring may also be read-only (0400, as a systemd credential is);
	// no other user may have any access to it.
	KeyringFileMode fs.FileMode = 0o600
	// maxKeyringSize bounds the file read.
	maxKeyringSize = 1 << 20
	keyringHeader  = "# sovra master keyring: \"<version> <base64 32-byte key>\" per line; the highest version seals.\n"
)

// Sentinel errors of the keyring.
var (
	// ErrKeyringPermissions: the file is readable or writable by others.
	ErrKeyringPermissions = errors.New("master keyring file must not be readable by other users (mode 0600 or 0400)")
	// ErrKeyringMalformed: the file does not parse.
	ErrKeyringMalformed = errors.New("master keyring file is malformed")
)

// Keyring is a set of master key versions. It is immutable and safe for
// concurrent use.
type Keyring struct {
	// keys maps a version id to its key; current is the highest id.
	keys    map[uint32][]byte
	current uint32
}

// NewKeyring returns a keyring of the given versions (copied). It fails when
// keys is empty, an id is zero or a key is not MasterKeySize bytes.
func NewKeyring(keys map[uint32][]byte) (*Keyring, error) {
	if len(keys) == 0 {
		return nil, fmt.Errorf("%w: no key versions", ErrKeyringMalformed)
	}
	k := &Keyring{keys: make(map[uint32][]byte, len(keys))}
	for id, key := range keys {
		if id == 0 {
			return nil, fmt.Errorf("%w: version 0 is not allowed", ErrKeyringMalformed)
		}
		if len(key) != MasterKeySize {
			return nil, fmt.Errorf("%w: version %d is %d bytes, want %d", ErrKeyringMalformed, id, len(key), MasterKeySize)
		}
		k.keys[id] = bytes.Clone(key)
		k.current = max(k.current, id)
	}
	return k, nil
}

// Current is the version new blobs are sealed with.
func (k *Keyring) Current() uint32 { return k.current }

// Versions lists the versions, ascending.
func (k *Keyring) Versions() []uint32 {
	out := make([]uint32, 0, len(k.keys))
	for id := range k.keys {
		out = append(out, id)
	}
	slices.Sort(out)
	return out
}

func (k *Keyring) key(id uint32) ([]byte, bool) {
	key, ok := k.keys[id]
	return key, ok
}

// LoadKeyring reads a keyring file. The file must be a regular file with
// mode 0600. Errors name the file and the line, never its contents.
func LoadKeyring(path string) (*Keyring, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("opening master keyring: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("opening master keyring: %w", err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("master keyring %s is not a regular file", path)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%w: %s has mode %#o: run chmod 0600 on it", ErrKeyringPermissions, path, st.Mode().Perm())
	}
	if st.Size() > maxKeyringSize {
		return nil, fmt.Errorf("%w: %s is larger than %d bytes", ErrKeyringMalformed, path, maxKeyringSize)
	}
	keys := map[uint32][]byte{}
	sc := bufio.NewScanner(f)
	for line := 1; sc.Scan(); line++ {
		text := strings.TrimSpace(sc.Text())
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		id, key, err := parseLine(text)
		if err != nil {
			return nil, fmt.Errorf("%w: %s line %d: %w", ErrKeyringMalformed, path, line, err)
		}
		if _, dup := keys[id]; dup {
			return nil, fmt.Errorf("%w: %s line %d: version %d listed twice", ErrKeyringMalformed, path, line, id)
		}
		keys[id] = key
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading master keyring %s: %w", path, err)
	}
	k, err := NewKeyring(keys)
	if err != nil {
		return nil, fmt.Errorf("loading master keyring %s: %w", path, err)
	}
	return k, nil
}

// parseLine parses "<id> <base64 key>"; its errors never quote the key.
func parseLine(text string) (uint32, []byte, error) {
	fields := strings.Fields(text)
	if len(fields) != 2 {
		return 0, nil, errors.New(`want "<version> <base64 key>"`)
	}
	id, err := strconv.ParseUint(fields[0], 10, 32)
	if err != nil || id == 0 {
		return 0, nil, errors.New("the version is not a positive integer")
	}
	key, err := base64.StdEncoding.Strict().DecodeString(fields[1])
	if err != nil {
		return 0, nil, errors.New("the key is not standard base64")
	}
	if len(key) != MasterKeySize {
		return 0, nil, fmt.Errorf("the key is %d bytes, want %d", len(key), MasterKeySize)
	}
	return uint32(id), key, nil
}

// CreateKeyring writes a new keyring file with one fresh random version (1)
// and mode 0600. It fails when the file exists.
func CreateKeyring(path string) error {
	return writeKeyring(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, nil)
}

// Rotate appends a fresh random version (one above the highest) to the
// keyring file at path, so new blobs use it while old ones still open.
// It returns the new version.
func Rotate(path string) (uint32, error) {
	k, err := LoadKeyring(path)
	if err != nil {
		return 0, err
	}
	next := k.current + 1
	if next == 0 {
		return 0, fmt.Errorf("%w: no version left above %d", ErrKeyringMalformed, k.current)
	}
	tmp := path + ".tmp"
	if err := writeKeyring(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, k); err != nil {
		return 0, err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return 0, fmt.Errorf("replacing master keyring: %w", err)
	}
	return next, nil
}

// writeKeyring writes the versions of old (nil: none) plus one fresh version.
func writeKeyring(path string, flag int, old *Keyring) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("creating master keyring directory: %w", err)
	}
	var b strings.Builder
	b.WriteString(keyringHeader)
	next := uint32(1)
	if old != nil {
		for _, id := range old.Versions() {
			key, _ := old.key(id)
			fmt.Fprintf(&b, "%d %s\n", id, base64.StdEncoding.EncodeToString(key))
		}
		next = old.current + 1
	}
	fresh := make([]byte, MasterKeySize)
	if _, err := rand.Read(fresh); err != nil {
		return fmt.Errorf("generating master key: %w", err)
	}
	fmt.Fprintf(&b, "%d %s\n", next, base64.StdEncoding.EncodeToString(fresh))
	f, err := os.OpenFile(path, flag, KeyringFileMode)
	if err != nil {
		return fmt.Errorf("creating master keyring: %w", err)
	}
	if err := f.Chmod(KeyringFileMode); err != nil {
		f.Close()
		return fmt.Errorf("securing master keyring: %w", err)
	}
	if _, err := f.WriteString(b.String()); err != nil {
		f.Close()
		return fmt.Errorf("writing master keyring: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("writing master keyring: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("writing master keyring: %w", err)
	}
	return nil
}
