// Package daemonconn is the agent's one connection to the daemon's node API,
// shared by every client the agent has there: enrollment and attestation,
// the cluster membership and bootstrap lease (agent/daemonlink), and the
// volume keys (agent/volumes).
//
// A Conn speaks TLS 1.3 only, verifies the daemon against the configured CA
// and server name, and presents the node credential (the client certificate
// of this boot's last passing attestation) whenever there is one. It bounds
// every call with a deadline, so a daemon that accepts connections and then
// stays silent costs a caller at most that deadline, and it redials with
// exponential backoff. Backoff and Retryable are the retry policy the
// callers share.
package daemonconn

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
)

// Defaults of the Config fields left zero, and the connection's backoff.
const (
	// DefaultCallTimeout bounds one unary call, queueing for the
	// connection included.
	DefaultCallTimeout = 10 * time.Second
	// DefaultStreamTimeout bounds one stream from open to close (an
	// enrollment: two round trips and a TPM credential activation).
	DefaultStreamTimeout = 30 * time.Second

	// Reconnection backoff of the transport: from dialBaseDelay, times
	// dialMultiplier per failure, ±dialJitter, at most dialMaxDelay.
	dialBaseDelay  = time.Second
	dialMultiplier = 1.6
	dialJitter     = 0.2
	dialMaxDelay   = 30 * time.Second
	// minConnectTimeout bounds one connection attempt (TCP and the TLS
	// handshake).
	minConnectTimeout = 5 * time.Second
)

// CredentialFunc returns the node credential: the client certificate of
// this boot's last passing attestation (agent/attest's
// Agent.ClientCertificate). It returns an error or nil before the first
// passing attestation and once the credential expired.
type CredentialFunc func(*tls.CertificateRequestInfo) (*tls.Certificate, error)

// Config is what a Conn needs. Endpoint and Roots are required.
type Config struct {
	// Endpoint is the daemon's node API, host:port.
	Endpoint string
	// Roots verify the daemon's certificate (its node-ca.crt).
	Roots *x509.CertPool
	// ServerName is the name the daemon's certificate must carry; empty
	// means the Endpoint's host.
	ServerName string
	// Credential is the node credential; nil means the Conn never presents
	// a client certificate.
	Credential CredentialFunc
	// CallTimeout bounds each unary call; zero means DefaultCallTimeout.
	CallTimeout time.Duration
	// StreamTimeout bounds each stream; zero means DefaultStreamTimeout.
	StreamTimeout time.Duration
}

// LoadRoots reads a PEM bundle of CA certificates (the daemon's
// node-ca.crt).
func LoadRoots(caFile string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("reading the daemon CA: %w", err)
	}

	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("reading the daemon CA: no certificate in %s", caFile)
	}

	return roots, nil
}

// Conn is a connection to the daemon's node API. It implements
// grpc.ClientConnInterface, so every generated client of the node API runs
// on it, and is safe for concurrent use.
//
// The TLS handshake decides which client certificate the daemon sees for
// the life of a transport. A Conn therefore keeps one gRPC connection per
// credential: when the node credential changes (the first passing
// attestation, a renewal, an expiry), the next call opens a new connection
// that presents the new one, and the old connection is closed once the
// calls still running on it have met their deadline.
type Conn struct {
	cfg        Config
	serverName string

	mu     sync.Mutex // guards cc, ccCred and closed
	cc     *grpc.ClientConn
	ccCred string // the credential cc presents: its leaf in DER, "" for none
	closed bool
}

var _ grpc.ClientConnInterface = (*Conn)(nil)

// ErrClosed is returned by calls on a closed Conn.
var ErrClosed = errors.New("the daemon connection is closed")

// New checks cfg and returns a Conn. It does not touch the network: the
// first call connects.
func New(cfg Config) (*Conn, error) {
	var problems []error

	host, _, err := net.SplitHostPort(cfg.Endpoint)
	if err != nil {
		problems = append(problems, fmt.Errorf("daemon endpoint %q: want host:port", cfg.Endpoint))
	}

	if cfg.Roots == nil {
		problems = append(problems, errors.New("no CA to verify the daemon with"))
	}

	if cfg.CallTimeout < 0 || cfg.StreamTimeout < 0 {
		problems = append(problems, errors.New("negative call or stream timeout"))
	}

	if len(problems) > 0 {
		return nil, fmt.Errorf("configuring the daemon connection: %w", errors.Join(problems...))
	}

	if cfg.CallTimeout == 0 {
		cfg.CallTimeout = DefaultCallTimeout
	}

	if cfg.StreamTimeout == 0 {
		cfg.StreamTimeout = DefaultStreamTimeout
	}

	name := cfg.ServerName
	if name == "" {
		name = host
	}

	return &Conn{cfg: cfg, serverName: name}, nil
}

// Endpoint returns the daemon's address.
func (c *Conn) Endpoint() string { return c.cfg.Endpoint }

// HasCredential reports whether a call now would present a node credential.
func (c *Conn) HasCredential() bool { return c.credential() != nil }

// credential returns the node credential to present now, nil for none.
func (c *Conn) credential() *tls.Certificate {
	if c.cfg.Credential == nil {
		return nil
	}

	cert, err := c.cfg.Credential(nil)
	if err != nil || cert == nil || len(cert.Certificate) == 0 {
		return nil
	}

	return cert
}

// tlsConfig returns the client TLS configuration of a connection that
// presents cert (nil: none).
func (c *Conn) tlsConfig(cert *tls.Certificate) *tls.Config {
	return &tls.Config{
		RootCAs:    c.cfg.Roots,
		ServerName: c.serverName,
		MinVersion: tls.VersionTLS13,
		// Always answer a certificate request: an empty certificate
		// means none, which the daemon accepts for enrollment and
		// attestation and refuses for the node-authenticated services.
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			if cert == nil {
				return &tls.Certificate{}, nil
			}

			return cert, nil
		},
	}
}

// conn returns the gRPC connection that presents the current credential,
// opening it when the credential changed since the last call.
func (c *Conn) conn() (*grpc.ClientConn, error) {
	cert := c.credential()

	key := ""
	if cert != nil {
		key = string(cert.Certificate[0])
	}

	c.mu.Lock()
	defer c.mu.Unlock()

	if c.closed {
		return nil, ErrClosed
	}

	if c.cc != nil && c.ccCred == key {
		return c.cc, nil
	}

	cc, err := grpc.NewClient(c.cfg.Endpoint,
		grpc.WithTransportCredentials(credentials.NewTLS(c.tlsConfig(cert))),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: backoff.Config{
				BaseDelay:  dialBaseDelay,
				Multiplier: dialMultiplier,
				Jitter:     dialJitter,
				MaxDelay:   dialMaxDelay,
			},
			MinConnectTimeout: minConnectTimeout,
		}),
	)
	if err != nil {
		return nil, fmt.Errorf("connecting to the daemon at %s: %w", c.cfg.Endpoint, err)
	}

	if old := c.cc; old != nil {
		// Calls still on the old connection end by their deadline.
		time.AfterFunc(max(c.cfg.CallTimeout, c.cfg.StreamTimeout), func() { _ = old.Close() })
	}

	c.cc, c.ccCred = cc, key

	return cc, nil
}

// Invoke implements grpc.ClientConnInterface: one unary call, bounded by
// CallTimeout (or ctx's own earlier deadline).
func (c *Conn) Invoke(ctx context.Context, method string, args, reply any, opts ...grpc.CallOption) error {
	cc, err := c.conn()
	if err != nil {
		return err
	}

	ctx, cancel := context.WithTimeout(ctx, c.cfg.CallTimeout)
	defer cancel()

	return cc.Invoke(ctx, method, args, reply, opts...)
}

// NewStream implements grpc.ClientConnInterface: one stream, bounded as a
// whole by StreamTimeout (or ctx's own earlier deadline).
func (c *Conn) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	cc, err := c.conn()
	if err != nil {
		return nil, err
	}

	ctx, cancel := context.WithTimeout(ctx, c.cfg.StreamTimeout)

	s, err := cc.NewStream(ctx, desc, method, opts...)
	if err != nil {
		cancel()

		return nil, err
	}

	return &stream{ClientStream: s, cancel: cancel}, nil
}

// stream releases its deadline's timer when the stream ends.
type stream struct {
	grpc.ClientStream
	cancel context.CancelFunc
}

// RecvMsg ends the stream's deadline with the stream: an error (io.EOF
// included) is the stream's last message.
func (s *stream) RecvMsg(m any) error {
	err := s.ClientStream.RecvMsg(m)
	if err != nil {
		s.cancel()
	}

	return err
}

// Close closes the connection; calls after it fail with ErrClosed.
func (c *Conn) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()

	c.closed = true

	if c.cc == nil {
		return nil
	}

	err := c.cc.Close()
	c.cc = nil

	return err
}
