package volume_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/siderolabs/kms-client/api/kms"
	"github.com/siderolabs/kms-client/pkg/server"
	"github.com/siderolabs/talos/pkg/machinery/config/configloader"
	"github.com/siderolabs/talos/pkg/machinery/resources/block"
	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/sovra-dev/sovra/tests/talosfake/volume"
)

// kmsServer is the upstream reference KMS (kms-client/pkg/server) on a
// plaintext gRPC port, with a key per node that the test can change, and
// a count of calls.
type kmsServer struct {
	addr string

	// mu guards the fields below.
	mu      sync.Mutex
	key     []byte
	seals   int
	unseals int
}

func startKMS(t *testing.T) *kmsServer {
	t.Helper()

	k := &kmsServer{key: newKey(t)}

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}

	k.addr = lis.Addr().String()

	ref := server.NewServer(zap.NewNop(), func(context.Context, string) ([]byte, error) {
		k.mu.Lock()
		defer k.mu.Unlock()

		return k.key, nil
	})

	srv := grpc.NewServer(grpc.UnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		k.mu.Lock()
		if strings.HasSuffix(info.FullMethod, "/Seal") {
			k.seals++
		} else {
			k.unseals++
		}
		k.mu.Unlock()

		return h(ctx, req)
	}))
	kms.RegisterKMSServiceServer(srv, ref)

	go srv.Serve(lis) //nolint:errcheck

	t.Cleanup(srv.Stop)

	return k
}

func (k *kmsServer) calls() (seals, unseals int) {
	k.mu.Lock()
	defer k.mu.Unlock()

	return k.seals, k.unseals
}

func newKey(t *testing.T) []byte {
	t.Helper()

	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}

	return b
}

// spec is a VolumeConfig's encryption with one KMS slot at endpoint, read
// through the machinery loader.
func spec(t *testing.T, endpoint string) volume.Spec {
	t.Helper()

	cfg, err := configloader.NewFromBytes([]byte(`apiVersion: v1alpha1
kind: VolumeConfig
name: STATE
encryption:
  provider: luks2
  keys:
    - slot: 0
      kms:
        endpoint: ` + endpoint + `
`))
	if err != nil {
		t.Fatal(err)
	}

	vc, ok := cfg.Volumes().ByName("STATE")
	if !ok {
		t.Fatal("no STATE volume config")
	}

	return volume.SpecFromConfig(vc.Encryption())
}

// TestFormatThenOpen: a new volume is sealed (one Seal) and opened (one
// Unseal) in the same Prepare; an existing one is only opened.
func TestFormatThenOpen(t *testing.T) {
	k := startKMS(t)
	s := spec(t, "grpc://"+k.addr)
	v := volume.Volume{Label: "STATE", Dir: filepath.Join(t.TempDir(), "STATE")}
	h := volume.Helpers{UUID: "0b7c3c36-6f3e-4f57-8f0e-3a1c5b1f2d10"}

	if v.Exists() || s.Provider != block.EncryptionProviderLUKS2 || s.Keys[0].KMSEndpoint != "grpc://"+k.addr {
		t.Fatalf("volume %v, spec %+v", v.Exists(), s)
	}

	res, err := v.Prepare(context.Background(), s, h, zap.NewNop())
	if err != nil || !res.Formatted {
		t.Fatalf("prepare: %+v %v", res, err)
	}

	if seals, unseals := k.calls(); seals != 1 || unseals != 1 {
		t.Fatalf("format: %d Seals, %d Unseals", seals, unseals)
	}

	blobs, err := volume.SealedBlobs(v.Dir)
	if err != nil || len(blobs[0]) == 0 {
		t.Fatalf("sealed blob: %v %v", blobs, err)
	}

	if err := os.WriteFile(filepath.Join(v.Data(), "config.yaml"), []byte("cfg"), 0o600); err != nil {
		t.Fatal(err)
	}

	res, err = v.Prepare(context.Background(), s, h, zap.NewNop())
	if err != nil || res.Formatted {
		t.Fatalf("second prepare: %+v %v", res, err)
	}

	if seals, unseals := k.calls(); seals != 1 || unseals != 2 {
		t.Fatalf("open: %d Seals, %d Unseals in all", seals, unseals)
	}

	if b, _ := os.ReadFile(filepath.Join(v.Data(), "config.yaml")); !bytes.Equal(b, []byte("cfg")) { //nolint:errcheck
		t.Fatal("opening formatted the volume again")
	}
}

// TestWrongKeyStaysLocked: a KMS that unseals other bytes (the reference
// server answers random bytes when the blob does not authenticate) leaves
// the volume locked: the unsealed key must open the key slot.
func TestWrongKeyStaysLocked(t *testing.T) {
	k := startKMS(t)
	s := spec(t, "grpc://"+k.addr)
	v := volume.Volume{Label: "STATE", Dir: filepath.Join(t.TempDir(), "STATE")}
	h := volume.Helpers{UUID: "0b7c3c36-6f3e-4f57-8f0e-3a1c5b1f2d10"}

	if _, err := v.Prepare(context.Background(), s, h, zap.NewNop()); err != nil {
		t.Fatal(err)
	}

	k.mu.Lock()
	k.key = newKey(t)
	k.mu.Unlock()

	_, err := v.Prepare(context.Background(), s, h, zap.NewNop())
	if err == nil || !strings.Contains(err.Error(), "no key available with this passphrase") {
		t.Fatalf("open with another key: %v", err)
	}

	if seals, _ := k.calls(); seals != 1 {
		t.Fatalf("a failed open sealed again: %d Seals", seals)
	}
}

// TestUnreachableKMS: a KMS that cannot be reached fails the open (the
// volume manager retries) and seals nothing.
func TestUnreachableKMS(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}

	addr := lis.Addr().String()
	lis.Close()

	v := volume.Volume{Label: "EPHEMERAL", Dir: filepath.Join(t.TempDir(), "EPHEMERAL")}

	_, err = v.Prepare(context.Background(), spec(t, "grpc://"+addr), volume.Helpers{UUID: "u"}, zap.NewNop())
	if err == nil || !strings.Contains(err.Error(), "failed to seal KMS passphrase") || v.Exists() {
		t.Fatalf("prepare with no KMS: %v, exists %v", err, v.Exists())
	}
}

// TestTypeMismatch: an unencrypted volume is not encrypted in place.
func TestTypeMismatch(t *testing.T) {
	k := startKMS(t)
	v := volume.Volume{Label: "STATE", Dir: filepath.Join(t.TempDir(), "STATE")}

	if _, err := v.Prepare(context.Background(), volume.Spec{}, volume.Helpers{}, zap.NewNop()); err != nil {
		t.Fatal(err)
	}

	_, err := v.Prepare(context.Background(), spec(t, "grpc://"+k.addr), volume.Helpers{UUID: "u"}, zap.NewNop())
	if !errors.Is(err, volume.ErrTypeMismatch) {
		t.Fatalf("encrypting a plain volume: %v", err)
	}
}

// TestMetaRoundTrip: STATE's encryption survives META tag 0x09.
func TestMetaRoundTrip(t *testing.T) {
	cfg, err := configloader.NewFromBytes([]byte(`apiVersion: v1alpha1
kind: VolumeConfig
name: STATE
encryption:
  provider: luks2
  keys:
    - slot: 1
      kms:
        endpoint: https://kms.example:7443
`))
	if err != nil {
		t.Fatal(err)
	}

	vc, _ := cfg.Volumes().ByName("STATE")

	data, err := volume.MarshalMeta(vc.Encryption())
	if err != nil {
		t.Fatal(err)
	}

	got, err := volume.UnmarshalMeta(data)
	if err != nil || !got.Encrypted() || len(got.Keys) != 1 || got.Keys[0].Slot != 1 || got.Keys[0].KMSEndpoint != "https://kms.example:7443" {
		t.Fatalf("round trip of %s: %+v %v", data, got, err)
	}

	none, err := volume.MarshalMeta(nil)
	if err != nil || string(none) != "null" {
		t.Fatalf("no encryption: %s %v", none, err)
	}

	if got, err := volume.UnmarshalMeta(none); err != nil || got.Encrypted() {
		t.Fatalf("null: %+v %v", got, err)
	}
}

// TestLockToState: a key locked to STATE is the KMS's key suffixed with
// STATE's salt (keys/salted.go): another salt does not open the volume;
// without the salt the Seal has already happened when the key fails.
func TestLockToState(t *testing.T) {
	k := startKMS(t)
	s := spec(t, "grpc://"+k.addr)
	s.Keys[0].LockToState = true

	salt := newKey(t)
	h := volume.Helpers{UUID: "u", Salt: func(context.Context) ([]byte, error) { return salt, nil }}
	v := volume.Volume{Label: "EPHEMERAL", Dir: filepath.Join(t.TempDir(), "EPHEMERAL")}

	if _, err := v.Prepare(context.Background(), s, h, zap.NewNop()); err != nil {
		t.Fatal(err)
	}

	if _, err := v.Prepare(context.Background(), s, h, zap.NewNop()); err != nil {
		t.Fatalf("reopen with the same salt: %v", err)
	}

	salt = newKey(t)

	if _, err := v.Prepare(context.Background(), s, h, zap.NewNop()); err == nil || !strings.Contains(err.Error(), "no key available") {
		t.Fatalf("open with another STATE's salt: %v", err)
	}

	noSalt := volume.Helpers{UUID: "u", Salt: func(context.Context) ([]byte, error) { return nil, errors.New("STATE is not open yet") }}
	w := volume.Volume{Label: "EPHEMERAL", Dir: filepath.Join(t.TempDir(), "EPHEMERAL")}
	seals, _ := k.calls()

	if _, err := w.Prepare(context.Background(), s, noSalt, zap.NewNop()); err == nil || !strings.Contains(err.Error(), "failed to get disk encryption key salt") {
		t.Fatalf("format without a salt: %v", err)
	}

	if after, _ := k.calls(); after != seals+1 || w.Exists() {
		t.Fatalf("format without a salt: %d Seals (want the one wasted), exists %v", after-seals, w.Exists())
	}
}
