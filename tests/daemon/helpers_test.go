package daemon_test

import (
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"path/filepath"
	"testing"
	"time"
)

// anonymousClient verifies the daemon's serving certificate with its CA and
// presents no credential.
func anonymousClient(t *testing.T, dataDir string) *http.Client {
	t.Helper()
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(mustRead(t, filepath.Join(dataDir, "ca.crt"))) {
		t.Fatal("no CA certificate")
	}
	return &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}},
	}
}
