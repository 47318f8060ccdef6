package daemonconn

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/sovra-dev/sovra/internal/nodeapi"
)

const (
	// serverName is the name in the test daemon's certificate, besides
	// 127.0.0.1.
	serverName = "daemon.test"
	// shortDeadline is the call timeout of the silent-daemon tests; slack
	// is what a call may take beyond it on a loaded machine.
	shortDeadline = 300 * time.Millisecond
	slack         = 2 * time.Second
	// guard ends a call the Conn failed to bound, so the test fails
	// instead of hanging.
	guard = 10 * time.Second
)

// authority is a test CA that issues server and client certificates.
type authority struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newAuthority(t *testing.T, name string) *authority {
	t.Helper()

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}

	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}

	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}

	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)

	return &authority{cert: cert, key: key, pool: pool}
}

var serial atomic.Int64

// issue returns a leaf for cn; a server leaf names serverName and 127.0.0.1.
func (a *authority) issue(t *testing.T, cn string, server bool) *tls.Certificate {
	t.Helper()

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}

	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(100 + serial.Add(1)), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}

	if server {
		tmpl.DNSNames, tmpl.IPAddresses = []string{serverName}, []net.IP{net.IPv4(127, 0, 0, 1)}
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	}

	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, &key.PublicKey, a.key)
	if err != nil {
		t.Fatal(err)
	}

	leaf, _ := x509.ParseCertificate(der)

	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

// daemon answers GetNonce with the common name of the client certificate
// the connection presented ("" for none), and can be made to hang.
type daemon struct {
	nodeapi.UnimplementedNodeServiceServer
	hang chan struct{} // closed at the end of the test; handlers wait on it when set
}

func (d *daemon) GetNonce(ctx context.Context, _ *nodeapi.NonceRequest) (*nodeapi.NonceResponse, error) {
	if d.hang != nil {
		select {
		case <-d.hang:
		case <-ctx.Done():
		}

		return nil, status.Error(codes.Internal, "hung")
	}

	p, _ := peer.FromContext(ctx)
	info, _ := p.AuthInfo.(credentials.TLSInfo)

	cn := ""
	if certs := info.State.PeerCertificates; len(certs) > 0 {
		cn = certs[0].Subject.CommonName
	}

	return &nodeapi.NonceResponse{Nonce: []byte(cn)}, nil
}

func (d *daemon) Enroll(s grpc.BidiStreamingServer[nodeapi.EnrollRequest, nodeapi.EnrollResponse]) error {
	<-s.Context().Done() // never answers

	return s.Context().Err()
}

// serve starts the daemon over TLS with cfg and returns its address.
func serve(t *testing.T, d *daemon, cfg *tls.Config) string {
	t.Helper()

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}

	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(cfg)))
	nodeapi.RegisterNodeServiceServer(g, d)

	go func() { _ = g.Serve(lis) }()

	t.Cleanup(g.Stop)

	return lis.Addr().String()
}

// serverTLS is the daemon's TLS: its certificate from ca, a client
// certificate asked for and checked against clients when given.
func serverTLS(t *testing.T, ca, clients *authority) *tls.Config {
	t.Helper()

	return &tls.Config{
		Certificates: []tls.Certificate{*ca.issue(t, "daemon", true)},
		MinVersion:   tls.VersionTLS12,
		ClientAuth:   tls.VerifyClientCertIfGiven,
		ClientCAs:    clients.pool,
	}
}

func dial(t *testing.T, cfg Config) *Conn {
	t.Helper()

	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}

	t.Cleanup(func() { _ = c.Close() })

	return c
}

// nonce calls GetNonce and returns the common name the daemon saw.
func nonce(ctx context.Context, c *Conn) (string, error) {
	resp, err := nodeapi.NewNodeServiceClient(c).GetNonce(ctx, &nodeapi.NonceRequest{Node: "ek-1"})

	return string(resp.GetNonce()), err
}

func TestNewReportsEveryProblem(t *testing.T) {
	_, err := New(Config{Endpoint: "no-port", CallTimeout: -time.Second})
	if err == nil {
		t.Fatal("a bad config was accepted")
	}

	for _, want := range []string{"want host:port", "no CA", "negative"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
}

func TestSilentDaemonCostsOneDeadline(t *testing.T) {
	ca := newAuthority(t, "node CA")

	// A daemon that accepts TCP connections and never says a word: no TLS
	// handshake, no HTTP/2 preface.
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}

	t.Cleanup(func() { _ = lis.Close() })

	var (
		mu    sync.Mutex
		conns []net.Conn
	)

	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}

			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()

	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()

		for _, c := range conns {
			_ = c.Close()
		}
	})

	// A daemon that completes TLS and then never answers a call.
	hang := make(chan struct{})
	t.Cleanup(func() { close(hang) })

	hung := serve(t, &daemon{hang: hang}, serverTLS(t, ca, ca))

	for name, addr := range map[string]string{"no handshake": lis.Addr().String(), "no answer": hung} {
		t.Run(name, func(t *testing.T) {
			c := dial(t, Config{Endpoint: addr, Roots: ca.pool, CallTimeout: shortDeadline, StreamTimeout: shortDeadline})

			ctx, cancel := context.WithTimeout(context.Background(), guard)
			defer cancel()

			start := time.Now()
			_, err := nonce(ctx, c)

			if took := time.Since(start); took > shortDeadline+slack {
				t.Fatalf("the call took %s, deadline %s", took, shortDeadline)
			}

			if status.Code(err) != codes.DeadlineExceeded || !Retryable(err) {
				t.Fatalf("call: %v, want a retryable DeadlineExceeded", err)
			}

			start = time.Now()

			stream, err := nodeapi.NewNodeServiceClient(c).Enroll(ctx)
			if err == nil {
				_, err = stream.Recv()
			}

			if took := time.Since(start); took > shortDeadline+slack {
				t.Fatalf("the stream took %s, deadline %s", took, shortDeadline)
			}

			if status.Code(err) != codes.DeadlineExceeded {
				t.Fatalf("stream: %v, want DeadlineExceeded", err)
			}
		})
	}
}

func TestRefusesTLS12(t *testing.T) {
	ca := newAuthority(t, "node CA")

	tls12 := serverTLS(t, ca, ca)
	tls12.MaxVersion = tls.VersionTLS12

	_, err := nonce(context.Background(), dial(t, Config{Endpoint: serve(t, &daemon{}, tls12), Roots: ca.pool, CallTimeout: 5 * time.Second}))
	if err == nil || !strings.Contains(err.Error(), "protocol version") {
		t.Fatalf("a TLS 1.2 daemon: %v, want a protocol version refusal", err)
	}

	// The same daemon with TLS 1.3 allowed is reached.
	if _, err := nonce(context.Background(), dial(t, Config{Endpoint: serve(t, &daemon{}, serverTLS(t, ca, ca)), Roots: ca.pool})); err != nil {
		t.Fatalf("a TLS 1.3 daemon: %v", err)
	}
}

func TestChecksTheServerName(t *testing.T) {
	ca := newAuthority(t, "node CA")
	addr := serve(t, &daemon{}, serverTLS(t, ca, ca))

	_, err := nonce(context.Background(), dial(t, Config{Endpoint: addr, Roots: ca.pool, ServerName: "other.test", CallTimeout: 5 * time.Second}))
	if err == nil || !strings.Contains(err.Error(), "other.test") {
		t.Fatalf("a certificate for %s accepted as other.test: %v", serverName, err)
	}

	for _, name := range []string{serverName, ""} { // "" checks the endpoint's host, 127.0.0.1
		if _, err := nonce(context.Background(), dial(t, Config{Endpoint: addr, Roots: ca.pool, ServerName: name})); err != nil {
			t.Errorf("server name %q: %v", name, err)
		}
	}

	other := newAuthority(t, "another CA")
	if _, err := nonce(context.Background(), dial(t, Config{Endpoint: addr, Roots: other.pool, CallTimeout: 5 * time.Second})); err == nil {
		t.Error("a daemon from another CA was accepted")
	}
}

func TestPresentsTheCurrentCredential(t *testing.T) {
	serverCA, nodeCA := newAuthority(t, "server CA"), newAuthority(t, "node CA")
	addr := serve(t, &daemon{}, serverTLS(t, serverCA, nodeCA))

	var (
		mu   sync.Mutex
		cred *tls.Certificate
	)

	set := func(c *tls.Certificate) {
		mu.Lock()
		defer mu.Unlock()

		cred = c
	}

	c := dial(t, Config{Endpoint: addr, Roots: serverCA.pool, Credential: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		mu.Lock()
		defer mu.Unlock()

		if cred == nil {
			return nil, errors.New("no valid node credential")
		}

		return cred, nil
	}})

	ctx := context.Background()

	for _, step := range []struct {
		cred *tls.Certificate
		want string
	}{
		{nil, ""}, // before the first attestation: no certificate, and the call goes through
		{nodeCA.issue(t, "boot-1", false), "boot-1"},
		{nodeCA.issue(t, "boot-2", false), "boot-2"}, // a renewal is presented on a new handshake
		{nil, ""}, // expired
	} {
		set(step.cred)

		if got := c.HasCredential(); got != (step.cred != nil) {
			t.Errorf("HasCredential = %v with credential %v", got, step.cred != nil)
		}

		if cn, err := nonce(ctx, c); err != nil || cn != step.want {
			t.Fatalf("the daemon saw %q (%v), want %q", cn, err, step.want)
		}
	}
}

func TestClosedConnRefusesCalls(t *testing.T) {
	ca := newAuthority(t, "node CA")
	c := dial(t, Config{Endpoint: serve(t, &daemon{}, serverTLS(t, ca, ca)), Roots: ca.pool})

	if _, err := nonce(context.Background(), c); err != nil {
		t.Fatal(err)
	}

	_ = c.Close()

	if _, err := nonce(context.Background(), c); !errors.Is(err, ErrClosed) {
		t.Fatalf("call after Close: %v", err)
	}
}
