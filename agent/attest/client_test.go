package attest

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestBackoffRetriesOnlyUnreachable(t *testing.T) {
	var waits []time.Duration
	b := Backoff{Base: time.Second, Max: 4 * time.Second, Sleep: func(_ context.Context, d time.Duration) error {
		waits = append(waits, d)
		return nil
	}}
	calls := 0
	err := b.Do(context.Background(), func(context.Context) error {
		calls++
		if calls < 5 {
			return status.Error(codes.Unavailable, "down")
		}
		return nil
	})
	if err != nil || calls != 5 {
		t.Fatalf("Do = %v after %d calls", err, calls)
	}
	caps := []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 4 * time.Second}
	for i, w := range waits {
		if w <= 0 || w > caps[i] {
			t.Errorf("wait %d = %v, want in (0, %v]", i, w, caps[i])
		}
	}
	calls = 0
	refused := status.Error(codes.PermissionDenied, "policy violated")
	if err := b.Do(context.Background(), func(context.Context) error { calls++; return refused }); !errors.Is(err, refused) || calls != 1 {
		t.Fatalf("a refusal was retried: %v after %d calls", err, calls)
	}
}

func TestBackoffStopsWithContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := Backoff{}.Do(ctx, func(context.Context) error { return status.Error(codes.Unavailable, "down") })
	if err == nil {
		t.Fatal("Do kept going after the context ended")
	}
}

func TestNodeKeyCSR(t *testing.T) {
	k, err := NewNodeKey()
	if err != nil {
		t.Fatal(err)
	}
	der, err := k.CSR("ek-1")
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil || csr.CheckSignature() != nil {
		t.Fatalf("CSR: %v", err)
	}
	pub, _ := x509.MarshalPKIXPublicKey(csr.PublicKey)
	sum := sha256.Sum256(pub)
	if h, _ := k.Hash(); h != hex.EncodeToString(sum[:]) {
		t.Fatal("the quoted hash is not the hash of the CSR's key")
	}
}
