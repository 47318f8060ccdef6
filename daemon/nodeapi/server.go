// Package nodeapi serves the node API over gRPC with TLS: enrollment, nonces
// and attestation on top of the attestation service, and, for callers with
// the node credential, membership and the bootstrap lease on top of the
// membership service. Every service but enrollment/attestation and the Talos
// KMS is authenticated by the node credential (package nodeauth) before its
// handler runs, so a service registered later is closed by default. It is
// the edge: errors become gRPC status codes here and nowhere else.
package nodeapi

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"time"

	kmsapi "github.com/siderolabs/kms-client/api/kms"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"k8s.io/client-go/rest"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/attestation"
	"github.com/sovra-dev/sovra/daemon/connlimit"
	"github.com/sovra-dev/sovra/daemon/membership"
	"github.com/sovra-dev/sovra/daemon/nodeauth"
	pb "github.com/sovra-dev/sovra/internal/nodeapi"
)

// Defaults and limits of the server.
const (
	// DefaultListen is the default of sovrad's --node-listen.
	DefaultListen = ":7443"
	// MaxMessageSize bounds any message a node sends: the event log (at
	// most 1 MiB) plus the rest of an attestation.
	MaxMessageSize = 2 << 20
	// EnrollTimeout bounds an enrollment round trip.
	EnrollTimeout = 30 * time.Second
	// SweepInterval is how often expired nonces are removed.
	SweepInterval = time.Minute
	// ShutdownGrace is how long Run waits for calls in flight at shutdown.
	ShutdownGrace = 10 * time.Second
	// maxConcurrentStreams bounds the calls per connection.
	maxConcurrentStreams = 64
)

// Config configures the node API server.
type Config struct {
	// Listen is the TCP address; empty means DefaultListen.
	Listen string
	// TLS is the serving configuration (certificate from the daemon's PKI).
	// It is required: the node API never serves plaintext.
	TLS *tls.Config
	// Attestation configures enrollment and attestation.
	Attestation attestation.Config
	// Cluster answers the ClusterService (membership, bootstrap lease),
	// whose callers authenticate with the node credential. NewServer builds
	// it on the same API when nil; NewServerWithStore serves no
	// ClusterService when nil.
	Cluster *membership.Service
	// PeerRate bounds the NodeService calls (enrollment, nonces,
	// attestation) per peer address, in calls a second; zero or less turns
	// the limit off.
	PeerRate float64
	// Auth authenticates the node credential of every call outside the
	// anonymous services; NewServer builds it on the same API when nil.
	Auth *nodeauth.Authenticator
}

// AnonymousServices are the services callers reach without a node
// credential: enrollment and attestation (which earn one) and the Talos KMS
// (Talos presents none). Every other service registered on the node API
// requires the node credential.
var AnonymousServices = []string{pb.NodeService_ServiceDesc.ServiceName, kmsapi.KMSService_ServiceDesc.ServiceName}

// Validate reports every problem of c at once.
func (c Config) Validate() error {
	var errs []error
	if c.TLS == nil || (len(c.TLS.Certificates) == 0 && c.TLS.GetCertificate == nil) {
		errs = append(errs, errors.New("node API needs a TLS serving certificate"))
	}
	if err := c.Attestation.Validate(); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("invalid node API config: %w", err)
	}
	return nil
}

// Server is the node API: a gRPC server over the attestation service.
type Server struct {
	cfg     Config
	service *attestation.Service
	grpc    *grpc.Server
	logger  *zap.Logger
}

// NewServer builds the node API on the Kubernetes API at kubeconfig.
func NewServer(cfg Config, kubeconfig *rest.Config, logger *zap.Logger) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if logger == nil {
		logger = zap.NewNop()
	}
	store, err := attestation.NewKubeStore(kubeconfig, logger)
	if err != nil {
		return nil, fmt.Errorf("creating node API: %w", err)
	}
	if cfg.Cluster == nil {
		if cfg.Cluster, err = membership.NewForConfig(membership.Config{}, kubeconfig, logger.Named("membership")); err != nil {
			return nil, fmt.Errorf("creating node API: %w", err)
		}
	}
	if cfg.Auth == nil {
		cfg.Auth = nodeauth.New(cfg.Attestation.NodeCA, nodeauth.APIRecords{Client: store.Client}, nil, logger.Named("nodeauth"))
	}
	return NewServerWithStore(cfg, store, nil, logger)
}

// NewServerWithStore builds the node API on any store and clock (nil is the
// system clock); tests use a fake client.
func NewServerWithStore(cfg Config, store attestation.Store, clock attestation.Clock, logger *zap.Logger) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if logger == nil {
		logger = zap.NewNop()
	}
	svc, err := attestation.New(cfg.Attestation, store, clock, logger)
	if err != nil {
		return nil, fmt.Errorf("creating node API: %w", err)
	}
	if cfg.Auth == nil {
		cfg.Auth = nodeauth.New(cfg.Attestation.NodeCA, storeRecords{store}, nil, logger.Named("nodeauth"))
	}
	limit := newPeerLimit(cfg.PeerRate, logger)
	authUnary, authStream := cfg.Auth.Interceptors(AnonymousServices...)
	g := grpc.NewServer(append(TransportOptions(cfg.TLS),
		grpc.ChainUnaryInterceptor(limit.unary, authUnary),
		grpc.ChainStreamInterceptor(limit.stream, authStream),
	)...)
	pb.RegisterNodeServiceServer(g, &handler{svc: svc, logger: logger})
	if cfg.Cluster != nil {
		pb.RegisterClusterServiceServer(g, newClusterHandler(cfg.Cluster, logger))
	}
	return &Server{cfg: cfg, service: svc, grpc: g, logger: logger}, nil
}

// TransportOptions are the node API's gRPC server settings without its
// interceptors: TLS with tlsCfg (at least TLS 1.2; a client certificate is
// requested, never required, unless tlsCfg says otherwise), bounded
// messages and streams, and the connlimit package's handshake, keepalive
// and read buffer settings. The node API serves with them; so does the bare
// server the KMS benchmark measures sovrad against (tests/cmd/kms-bare).
func TransportOptions(tlsCfg *tls.Config) []grpc.ServerOption {
	tlsCfg = tlsCfg.Clone()
	if tlsCfg.MinVersion < tls.VersionTLS12 {
		tlsCfg.MinVersion = tls.VersionTLS12
	}
	if tlsCfg.ClientAuth == tls.NoClientCert {
		// Ask for the node credential without requiring it (enrollment and
		// attestation have none); the ClusterService verifies it.
		tlsCfg.ClientAuth = tls.RequestClientCert
	}
	return []grpc.ServerOption{
		grpc.Creds(credentials.NewTLS(tlsCfg)),
		grpc.MaxRecvMsgSize(MaxMessageSize),
		grpc.MaxConcurrentStreams(maxConcurrentStreams),
		grpc.ReadBufferSize(connlimit.ReadBufferSize),
		grpc.ConnectionTimeout(connlimit.HandshakeTimeout),
		grpc.KeepaliveParams(connlimit.Keepalive),
		grpc.KeepaliveEnforcementPolicy(connlimit.KeepalivePolicy),
	}
}

// Register adds a further service to the node API's gRPC server, on the
// same listener and TLS identity (sovrad puts the Talos KMS there). Call it
// before Run.
func (s *Server) Register(register func(grpc.ServiceRegistrar)) { register(s.grpc) }

// storeRecords reads records for the authenticator through the
// attestation store.
type storeRecords struct{ store attestation.Store }

func (r storeRecords) Get(ctx context.Context, name string) (*v1alpha1.SovraNode, error) {
	n, err := r.store.GetNode(ctx, name)
	if errors.Is(err, attestation.ErrNodeNotFound) {
		return nil, nodeauth.ErrNotFound
	}
	return n, err
}

// Service returns the attestation service behind the server.
func (s *Server) Service() *attestation.Service { return s.service }

// Run listens on cfg.Listen and serves until ctx ends, then stops gracefully
// within ShutdownGrace.
func (s *Server) Run(ctx context.Context) error {
	addr := s.cfg.Listen
	if addr == "" {
		addr = DefaultListen
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listening for the node API on %s: %w", addr, err)
	}
	return s.Serve(ctx, lis)
}

// Serve serves on lis until ctx ends.
func (s *Server) Serve(ctx context.Context, lis net.Listener) error {
	s.logger.Info("node API listening", zap.String("address", lis.Addr().String()))
	errc := make(chan error, 1)
	go func() { errc <- s.grpc.Serve(lis) }()
	sweep := time.NewTicker(SweepInterval)
	defer sweep.Stop()
	for {
		select {
		case err := <-errc:
			return fmt.Errorf("serving the node API: %w", err)
		case <-sweep.C:
			if err := s.service.SweepNonces(ctx); err != nil {
				s.logger.Warn("sweeping nonces", zap.Error(err))
			}
		case <-ctx.Done():
			done := make(chan struct{})
			go func() { s.grpc.GracefulStop(); close(done) }()
			select {
			case <-done:
			case <-time.After(ShutdownGrace):
				s.grpc.Stop()
			}
			return nil
		}
	}
}
