package kms

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

	"github.com/sovra-dev/sovra/daemon/connlimit"
	"github.com/sovra-dev/sovra/daemon/nodeauth"
)

const (
	// shutdownGrace is how long Serve waits for calls in flight.
	shutdownGrace = 5 * time.Second
	// maxConcurrentStreams bounds calls per connection (Talos makes one).
	maxConcurrentStreams = 16
)

// NewGRPCServer returns a gRPC server over TLS for the KMS and the volume
// key API, with requests bounded by MaxRequestSize. Client certificates
// may be verified but never required: Talos presents none. auth
// authenticates the node credential of every call but the KMS's.
func NewGRPCServer(tlsCfg *tls.Config, auth *nodeauth.Authenticator) (*grpc.Server, error) {
	if tlsCfg == nil || (len(tlsCfg.Certificates) == 0 && tlsCfg.GetCertificate == nil) {
		return nil, errors.New("the KMS needs a TLS serving certificate")
	}
	if tlsCfg.ClientAuth > tls.VerifyClientCertIfGiven {
		return nil, errors.New("the KMS must not require client certificates: Talos presents none")
	}
	if auth == nil {
		return nil, errors.New("the KMS server needs the node credential authenticator for the volume key service")
	}
	tlsCfg = tlsCfg.Clone()
	tlsCfg.MinVersion = max(tlsCfg.MinVersion, tls.VersionTLS12)
	unary, stream := auth.Interceptors(kmsapi.KMSService_ServiceDesc.ServiceName)
	return grpc.NewServer(
		grpc.Creds(credentials.NewTLS(tlsCfg)),
		grpc.ChainUnaryInterceptor(unary),
		grpc.ChainStreamInterceptor(stream),
		grpc.MaxRecvMsgSize(MaxRequestSize),
		grpc.MaxConcurrentStreams(maxConcurrentStreams),
		grpc.ReadBufferSize(connlimit.ReadBufferSize),
		grpc.ConnectionTimeout(connlimit.HandshakeTimeout),
		grpc.KeepaliveParams(connlimit.Keepalive),
		grpc.KeepaliveEnforcementPolicy(connlimit.KeepalivePolicy),
	), nil
}

// Serve runs the KMS on its own TLS listener lis until ctx ends: the gRPC
// server and Run together. It closes lis. auth authenticates the node
// credentials of the volume key service.
func (s *Service) Serve(ctx context.Context, lis net.Listener, tlsCfg *tls.Config, auth *nodeauth.Authenticator) error {
	g, err := NewGRPCServer(tlsCfg, auth)
	if err != nil {
		_ = lis.Close()
		return err
	}
	s.Register(g)
	s.RegisterVolumeKeys(g)
	s.logger.Info("KMS listening", zap.String("address", lis.Addr().String()))
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 2)
	go func() { errc <- s.Run(ctx) }()
	go func() {
		if err := g.Serve(lis); err != nil {
			errc <- fmt.Errorf("serving the KMS: %w", err)
		}
	}()
	select {
	case err := <-errc:
		cancel()
		g.Stop()
		return err
	case <-ctx.Done():
	}
	done := make(chan struct{})
	go func() { g.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(shutdownGrace):
		g.Stop()
	}
	return nil
}
