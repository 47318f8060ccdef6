package volumes_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/sovra-dev/sovra/agent/volumes"
	"github.com/sovra-dev/sovra/internal/testutil"
)

// volumeSize fits LUKS2's 16 MiB header and some data.
const volumeSize = 32 << 20

// fakeKeys releases keys per (volume, version), as the daemon would derive
// them, or refuses.
type fakeKeys struct {
	keys    map[uint32][]byte
	current uint32
	refuse  error
	asked   []uint32
}

func (f *fakeKeys) VolumeKey(_ context.Context, _ string, version uint32) ([]byte, uint32, error) {
	f.asked = append(f.asked, version)
	if f.refuse != nil {
		return nil, 0, f.refuse
	}
	if version == 0 {
		version = f.current
	}
	return bytes.Clone(f.keys[version]), version, nil
}

func random(t *testing.T) []byte {
	t.Helper()
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func newDevice(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "vol.img")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, volumeSize); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestFormatThenVerify(t *testing.T) {
	testutil.Require(t, "cryptsetup")
	ctx := context.Background()
	keys := &fakeKeys{keys: map[uint32][]byte{1: random(t), 2: random(t)}, current: 1}
	m := &volumes.Manager{Keys: keys}
	v := volumes.Volume{ID: "data", Device: newDevice(t)}
	if out, _, err := m.Prepare(ctx, v, ""); err != nil || out != volumes.Formatted {
		t.Fatalf("first use: %s, %v", out, err)
	}
	// The master key rotates: the volume still asks for the version it
	// was formatted with, which its LUKS2 token records.
	keys.current = 2
	if out, _, err := m.Prepare(ctx, v, ""); err != nil || out != volumes.Verified {
		t.Fatalf("next boot: %s, %v", out, err)
	}
	if keys.asked[len(keys.asked)-1] != 1 {
		t.Fatalf("asked for version %d, want the recorded 1", keys.asked[len(keys.asked)-1])
	}
	// The key is nowhere on the volume.
	image, _ := os.ReadFile(v.Device)
	if bytes.Contains(image, keys.keys[1]) {
		t.Fatal("the volume holds its key")
	}
	// A volume that does not take the released key.
	keys.keys[1] = random(t)
	if _, _, err := m.Prepare(ctx, v, ""); !errors.Is(err, volumes.ErrKeyRejected) {
		t.Fatalf("wrong key: %v", err)
	}
}

func TestRefusedKeyFormatsNothing(t *testing.T) {
	m := &volumes.Manager{Keys: &fakeKeys{refuse: errors.New("permission denied")}}
	dev := newDevice(t)
	if _, _, err := m.Prepare(context.Background(), volumes.Volume{ID: "data", Device: dev}, ""); err == nil {
		t.Fatal("prepared without a key")
	}
	head := make([]byte, 6)
	f, _ := os.Open(dev)
	defer f.Close()
	_, _ = f.Read(head)
	if bytes.HasPrefix(head, []byte("LUKS")) {
		t.Fatal("formatted without a key")
	}
}

func TestForeignLUKSHeaderIsLeftAlone(t *testing.T) {
	testutil.Require(t, "cryptsetup")
	dev := newDevice(t)
	cmd := exec.Command("cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--pbkdf-memory", "32768", "--iter-time", "100", "--key-file=-", dev)
	cmd.Stdin = bytes.NewReader(random(t))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	keys := &fakeKeys{keys: map[uint32][]byte{1: random(t)}, current: 1}
	m := &volumes.Manager{Keys: keys}
	if _, _, err := m.Prepare(context.Background(), volumes.Volume{ID: "data", Device: dev}, ""); !errors.Is(err, volumes.ErrInvalidVolume) {
		t.Fatalf("foreign header: %v", err)
	}
	if len(keys.asked) != 0 {
		t.Fatal("asked for a key for a volume the agent does not own")
	}
}

func TestInvalidVolume(t *testing.T) {
	m := &volumes.Manager{Keys: &fakeKeys{}}
	for _, v := range []volumes.Volume{{ID: "Data", Device: "/x"}, {ID: "data"}, {ID: "../x", Device: "/x"}} {
		if _, _, err := m.Prepare(context.Background(), v, ""); !errors.Is(err, volumes.ErrInvalidVolume) {
			t.Fatalf("%+v: %v", v, err)
		}
	}
}
