package custody_test

import (
	"bytes"
	"encoding/base64"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sovra-dev/sovra/daemon/custody"
)

const nodeA, nodeB = "0c8d2a3e-5a44-4f0c-9d11-1f2e3d4c5b6a", "7f1e9c2d-2b33-4e5f-8a7b-6c5d4e3f2a1b"

func keyring(t *testing.T) (*custody.Keyring, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "master.key")
	if err := custody.CreateKeyring(path); err != nil {
		t.Fatal(err)
	}
	k, err := custody.LoadKeyring(path)
	if err != nil {
		t.Fatal(err)
	}
	return k, path
}

func salt(t *testing.T) []byte {
	t.Helper()
	s, err := custody.NewSalt()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestSealOpen(t *testing.T) {
	k, _ := keyring(t)
	s := salt(t)
	data := bytes.Repeat([]byte{0x5a}, 32)
	blob, err := k.Seal(s, nodeA, data)
	if err != nil {
		t.Fatal(err)
	}
	if len(blob) != len(data)+custody.Overhead {
		t.Fatalf("blob of %d bytes, want %d", len(blob), len(data)+custody.Overhead)
	}
	if bytes.Contains(blob, data) {
		t.Fatal("blob holds the plaintext")
	}
	got, err := k.Open(s, nodeA, blob)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("Open = %x, %v", got, err)
	}
}

func TestOpenRefuses(t *testing.T) {
	k, _ := keyring(t)
	other, _ := keyring(t)
	s := salt(t)
	data := bytes.Repeat([]byte{0x11}, 32)
	blob, err := k.Seal(s, nodeA, data)
	if err != nil {
		t.Fatal(err)
	}
	flip := func(i int) []byte { b := bytes.Clone(blob); b[i] ^= 1; return b }
	unknownKey := bytes.Clone(blob)
	unknownKey[4] = 9
	for _, tc := range []struct {
		name string
		k    *custody.Keyring
		salt []byte
		uuid string
		blob []byte
		want error
	}{
		{"another node", k, s, nodeB, blob, custody.ErrOpen},
		{"another salt (re-created record)", k, salt(t), nodeA, blob, custody.ErrOpen},
		{"another master key", other, s, nodeA, blob, custody.ErrOpen},
		{"tampered ciphertext", k, s, nodeA, flip(len(blob) - 20), custody.ErrOpen},
		{"tampered tag", k, s, nodeA, flip(len(blob) - 1), custody.ErrOpen},
		{"tampered nonce", k, s, nodeA, flip(6), custody.ErrOpen},
		{"unknown key version", k, s, nodeA, unknownKey, custody.ErrUnknownKey},
		{"unknown format", k, s, nodeA, flip(0), custody.ErrMalformed},
		{"truncated", k, s, nodeA, blob[:custody.Overhead], custody.ErrMalformed},
		{"header only", k, s, nodeA, blob[:custody.HeaderSize], custody.ErrMalformed},
		{"empty", k, s, nodeA, nil, custody.ErrMalformed},
		{"oversized", k, s, nodeA, append(bytes.Clone(blob), make([]byte, custody.MaxBlob)...), custody.ErrMalformed},
		{"no salt", k, nil, nodeA, blob, custody.ErrSalt},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.k.Open(tc.salt, tc.uuid, tc.blob)
			if !errors.Is(err, tc.want) || got != nil {
				t.Fatalf("Open = %x, %v; want %v", got, err, tc.want)
			}
			if strings.Contains(err.Error(), base64.StdEncoding.EncodeToString(data)) {
				t.Fatal("error leaks the data")
			}
		})
	}
}

func TestRotation(t *testing.T) {
	k, path := keyring(t)
	s := salt(t)
	data := []byte("0123456789abcdef0123456789abcdef")
	old, err := k.Seal(s, nodeA, data)
	if err != nil {
		t.Fatal(err)
	}
	v, err := custody.Rotate(path)
	if err != nil || v != 2 {
		t.Fatalf("Rotate = %d, %v", v, err)
	}
	k2, err := custody.LoadKeyring(path)
	if err != nil {
		t.Fatal(err)
	}
	if k2.Current() != 2 {
		t.Fatalf("current = %d", k2.Current())
	}
	if got, err := k2.Open(s, nodeA, old); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("old blob after rotation: %v", err)
	}
	blob, err := k2.Seal(s, nodeA, data)
	if err != nil {
		t.Fatal(err)
	}
	id, _ := custody.ParseHeader(blob)
	if id != 2 {
		t.Fatalf("new blob sealed with version %d", id)
	}
	if _, err := k.Open(s, nodeA, blob); !errors.Is(err, custody.ErrUnknownKey) {
		t.Fatalf("old keyring opened a new-version blob: %v", err)
	}
	st, _ := os.Stat(path)
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v after rotation", st.Mode())
	}
}

func TestLoadKeyringStrict(t *testing.T) {
	secret := base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{7}, 32))
	short := base64.StdEncoding.EncodeToString([]byte("short"))
	for _, tc := range []struct {
		name, text string
		mode       os.FileMode
		want       error
	}{
		{"group readable", "1 " + secret + "\n", 0o640, custody.ErrKeyringPermissions},
		{"world readable", "1 " + secret + "\n", 0o644, custody.ErrKeyringPermissions},
		{"read-only credential", "1 " + secret + "\n", 0o400, nil},
		{"empty", "# nothing\n", 0o600, custody.ErrKeyringMalformed},
		{"short key", "1 " + short + "\n", 0o600, custody.ErrKeyringMalformed},
		{"not base64", "1 " + secret[:10] + "!!\n", 0o600, custody.ErrKeyringMalformed},
		{"version zero", "0 " + secret + "\n", 0o600, custody.ErrKeyringMalformed},
		{"duplicate", "1 " + secret + "\n1 " + secret + "\n", 0o600, custody.ErrKeyringMalformed},
		{"extra field", "1 " + secret + " x\n", 0o600, custody.ErrKeyringMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "k")
			if err := os.WriteFile(path, []byte(tc.text), tc.mode); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(path, tc.mode); err != nil {
				t.Fatal(err)
			}
			_, err := custody.LoadKeyring(path)
			if !errors.Is(err, tc.want) {
				t.Fatalf("LoadKeyring = %v, want %v", err, tc.want)
			}
			if err != nil && strings.Contains(err.Error(), secret[:12]) {
				t.Fatalf("error leaks key material: %v", err)
			}
		})
	}
}

func TestCreateKeyringRefusesExisting(t *testing.T) {
	_, path := keyring(t)
	if err := custody.CreateKeyring(path); err == nil {
		t.Fatal("CreateKeyring overwrote an existing keyring")
	}
}

func FuzzOpen(f *testing.F) {
	k, err := custody.NewKeyring(map[uint32][]byte{1: bytes.Repeat([]byte{1}, 32)})
	if err != nil {
		f.Fatal(err)
	}
	s := bytes.Repeat([]byte{2}, custody.SaltSize)
	blob, _ := k.Seal(s, nodeA, make([]byte, 32))
	f.Add(blob)
	f.Add([]byte{1})
	f.Fuzz(func(t *testing.T, b []byte) {
		if _, err := k.Open(s, nodeA, b); err != nil && bytes.Equal(b, blob) {
			t.Fatal("the genuine blob did not open")
		}
	})
}

func TestVolumeKey(t *testing.T) {
	k, path := keyring(t)
	s := salt(t)
	v1, ver, err := k.VolumeKey(0, s, nodeA, "data")
	if err != nil || ver != 1 || len(v1) != custody.VolumeKeySize {
		t.Fatalf("VolumeKey = %d bytes, version %d, %v", len(v1), ver, err)
	}
	again, _, _ := k.VolumeKey(1, s, nodeA, "data")
	if !bytes.Equal(v1, again) {
		t.Fatal("the volume key is not stable")
	}
	for _, other := range []func() ([]byte, uint32, error){
		func() ([]byte, uint32, error) { return k.VolumeKey(1, s, nodeA, "data2") },
		func() ([]byte, uint32, error) { return k.VolumeKey(1, s, nodeB, "data") },
		func() ([]byte, uint32, error) { return k.VolumeKey(1, salt(t), nodeA, "data") },
	} {
		if o, _, _ := other(); bytes.Equal(o, v1) {
			t.Fatal("another volume, node or salt gave the same key")
		}
	}
	if _, _, err := k.VolumeKey(7, s, nodeA, "data"); !errors.Is(err, custody.ErrUnknownKey) {
		t.Fatalf("unknown version: %v", err)
	}
	if _, err := custody.Rotate(path); err != nil {
		t.Fatal(err)
	}
	k2, _ := custody.LoadKeyring(path)
	old, _, _ := k2.VolumeKey(1, s, nodeA, "data")
	if !bytes.Equal(old, v1) {
		t.Fatal("rotation changed the key of a volume formatted with version 1")
	}
	if _, ver, _ := k2.VolumeKey(0, s, nodeA, "data"); ver != 2 {
		t.Fatalf("new volumes use version %d", ver)
	}
}
