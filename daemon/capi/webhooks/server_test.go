package webhooks

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/sovra-dev/sovra/daemon/pki"
)

// TestServerServesOverTLSFromTheCA: a client that trusts only the daemon's CA
// (as the API server does through caBundle) reaches a registered hook.
func TestServerServesOverTLSFromTheCA(t *testing.T) {
	dir := t.TempDir()
	ca, err := pki.EnsureCA(dir, "test-ca")
	if err != nil {
		t.Fatal(err)
	}
	s, err := Listen(ca, dir, net.IPv4(127, 0, 0, 1), zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	s.Register("/hook", http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "served") }))
	if s.StartedChecker()(nil) == nil {
		t.Fatal("the server reports started before Start")
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Start(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Start: %v", err)
		}
	}()

	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca.PEM)
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}}
	if !strings.HasPrefix(s.URL(), "https://127.0.0.1:") {
		t.Fatalf("URL %s", s.URL())
	}
	resp, err := client.Get(s.URL() + "/hook")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "served" {
		t.Fatalf("body %q", body)
	}
	if err := s.StartedChecker()(nil); err != nil {
		t.Fatalf("started checker: %v", err)
	}

	defer func() {
		if recover() == nil {
			t.Error("registering a path twice did not panic")
		}
	}()
	s.Register("/hook", http.NotFoundHandler())
}
