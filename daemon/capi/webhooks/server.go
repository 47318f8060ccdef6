// Package webhooks serves the admission and conversion webhooks of Cluster
// API and the Talos providers inside sovrad, over TLS with a certificate from
// the daemon's CA, and registers them with the API server by URL, as
// cert-manager and a webhook Service do in a normal management cluster.
//
// Every replica serves the webhooks; the replica holding the controllers'
// leader lease registers its own URL (see Registrar), so the registration
// always names a live server while any controller-running replica is up.
package webhooks

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/webhook"

	"github.com/sovra-dev/sovra/daemon/pki"
)

// Files in the data directory.
const (
	CertFile = "webhook.crt"
	KeyFile  = "webhook.key"

	commonName        = "sovrad-webhooks"
	readHeaderTimeout = 10 * time.Second
	shutdownTimeout   = 5 * time.Second
)

// Server is a controller-runtime webhook server on a listener bound before the
// manager starts, so its URL is known before anything is registered.
type Server struct {
	listener net.Listener
	tls      *tls.Config
	mux      *http.ServeMux
	log      *zap.Logger
	started  atomic.Bool

	// mu guards paths.
	mu    sync.Mutex
	paths []string
}

var _ webhook.Server = (*Server)(nil)

// Listen issues (or reuses) the webhook serving certificate in dataDir for ip
// and loopback, and listens on ip at a free port.
func Listen(ca *pki.CA, dataDir string, ip net.IP, log *zap.Logger) (*Server, error) {
	certPath, keyPath := filepath.Join(dataDir, CertFile), filepath.Join(dataDir, KeyFile)
	leaf := pki.Leaf{
		CommonName: commonName,
		DNSNames:   []string{"localhost"},
		IPs:        []net.IP{net.IPv4(127, 0, 0, 1)},
		Usage:      []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if !ip.IsLoopback() {
		leaf.IPs = append(leaf.IPs, ip)
	}
	if _, err := ca.EnsureLeaf(certPath, keyPath, leaf); err != nil {
		return nil, fmt.Errorf("issuing the webhook serving certificate: %w", err)
	}
	cert, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		return nil, fmt.Errorf("loading the webhook serving certificate: %w", err)
	}
	l, err := net.Listen("tcp", net.JoinHostPort(ip.String(), "0"))
	if err != nil {
		return nil, fmt.Errorf("listening for webhooks on %s: %w", ip, err)
	}
	return &Server{
		listener: l,
		tls:      &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
		mux:      http.NewServeMux(),
		log:      log,
	}, nil
}

// URL is the server's base URL, https://ip:port.
func (s *Server) URL() string {
	addr := s.listener.Addr().(*net.TCPAddr)
	return "https://" + net.JoinHostPort(addr.IP.String(), strconv.Itoa(addr.Port))
}

// Paths returns the registered webhook paths.
func (s *Server) Paths() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.paths)
}

// NeedLeaderElection is false: every replica serves the webhooks.
func (s *Server) NeedLeaderElection() bool { return false }

// Register serves hook at path. It panics on a path registered twice, as
// controller-runtime's server does.
func (s *Server) Register(path string, hook http.Handler) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if slices.Contains(s.paths, path) {
		panic(fmt.Sprintf("webhook path %s registered twice", path))
	}
	s.paths = append(s.paths, path)
	s.mux.Handle(path, hook)
}

// Start serves until ctx ends.
func (s *Server) Start(ctx context.Context) error {
	srv := &http.Server{Handler: s.mux, TLSConfig: s.tls, ReadHeaderTimeout: readHeaderTimeout}
	done := make(chan struct{})
	go func() {
		defer close(done)
		<-ctx.Done()
		shutdownCtx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
		defer cancel()
		_ = srv.Shutdown(shutdownCtx)
	}()
	s.started.Store(true)
	s.log.Info("serving Cluster API webhooks", zap.String("url", s.URL()), zap.Int("paths", len(s.Paths())))
	err := srv.ServeTLS(s.listener, "", "")
	<-done
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return fmt.Errorf("serving webhooks: %w", err)
}

// StartedChecker is healthy once the server serves.
func (s *Server) StartedChecker() healthz.Checker {
	return func(*http.Request) error {
		if !s.started.Load() {
			return errors.New("webhook server not started")
		}
		return nil
	}
}

// WebhookMux returns the server's mux.
func (s *Server) WebhookMux() *http.ServeMux { return s.mux }

// Close releases the listener of a server that will not be started.
func (s *Server) Close() error { return s.listener.Close() }
