// Package trustd imitates Talos's trustd, the service through which a
// worker gets the certificate of its Talos API: a control-plane node serves
// the security API on port 50001, signs a server-only certificate from the
// cluster's Talos CA for a caller that presents the machine token, and
// answers with its accepted CAs; a worker's machined asks the control-plane
// endpoints for one.
//
// Talos sources imitated (siderolabs/talos v1.13.9):
//   - internal/app/trustd/main.go and internal/app/trustd/internal/reg/reg.go
//     (the server: token per call, server-auth-only certificates, the
//     accepted CAs in the answer);
//   - pkg/grpc/middleware/auth/basic (the token as gRPC metadata "token",
//     TLS verified against the accepted CAs);
//   - pkg/grpc/gen/remote.go (the client: round-robin over the endpoints on
//     port 50001, exponential retries for a minute, 10 s per attempt);
//   - internal/app/machined/pkg/controllers/secrets/api.go generateWorker
//     (a CSR for the node's SANs; apid then accepts client certificates of
//     the CAs trustd returned, not the worker's own machine.acceptedCAs).
package trustd

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	stdx509 "crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/siderolabs/crypto/x509"
	"github.com/siderolabs/go-retry/retry"
	securityapi "github.com/siderolabs/talos/pkg/machinery/api/security"
	"github.com/siderolabs/talos/pkg/machinery/client/resolver"
	"github.com/siderolabs/talos/pkg/machinery/constants"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// Timings of pkg/grpc/gen/remote.go.
const (
	identityTimeout = time.Minute
	attemptTimeout  = 10 * time.Second
	retryUnit       = time.Second
	retryJitter     = 100 * time.Millisecond
)

// tokenKey is the metadata key of the machine token (basic.TokenCredentials).
const tokenKey = "token"

// Server is a control-plane node's trustd.
type Server struct {
	securityapi.UnimplementedSecurityServiceServer

	// Token is the machine token (machine.token) callers must present.
	Token string
	// CA is the issuing Talos CA, with its key.
	CA *x509.PEMEncodedCertificateAndKey
	// AcceptedCAs are returned to callers with the CA: the CAs whose
	// client certificates their apid accepts.
	AcceptedCAs []*x509.PEMEncodedCertificate
	// ServerCert is trustd's own server certificate.
	ServerCert *x509.PEMEncodedCertificateAndKey
	// Logger gets a line per signing request.
	Logger *zap.Logger
}

// Serve serves the security API on lis until ctx is done.
func (s *Server) Serve(ctx context.Context, lis net.Listener) error {
	cert, err := tls.X509KeyPair(s.ServerCert.Crt, s.ServerCert.Key)
	if err != nil {
		return fmt.Errorf("loading trustd's certificate: %w", err)
	}

	srv := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})),
		grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
			if err := s.authenticate(ctx); err != nil {
				return nil, err
			}

			return handler(ctx, req)
		}),
	)
	securityapi.RegisterSecurityServiceServer(srv, s)

	go func() {
		<-ctx.Done()
		srv.Stop()
	}()

	if err := srv.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("serving trustd: %w", err)
	}

	return nil
}

// authenticate is basic.TokenCredentials.authenticate.
func (s *Server) authenticate(ctx context.Context) error {
	md, ok := metadata.FromIncomingContext(ctx)
	if !ok || len(md[tokenKey]) == 0 {
		return status.Error(codes.Unauthenticated, "missing token")
	}

	got := sha256.Sum256([]byte(md[tokenKey][0]))
	want := sha256.Sum256([]byte(s.Token))

	if subtle.ConstantTimeCompare(got[:], want[:]) != 1 {
		return status.Error(codes.Unauthenticated, "invalid token")
	}

	return nil
}

// Certificate implements securityapi.SecurityServiceServer as trustd's
// Registrator does.
func (s *Server) Certificate(ctx context.Context, in *securityapi.CertificateRequest) (*securityapi.CertificateResponse, error) {
	remote, ok := peer.FromContext(ctx)
	if !ok {
		return nil, status.Error(codes.PermissionDenied, "peer not found")
	}

	block, _ := pem.Decode(in.GetCsr())
	if block == nil {
		return nil, status.Errorf(codes.InvalidArgument, "failed to decode CSR")
	}

	request, err := stdx509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "failed to parse CSR: %s", err)
	}

	if s.Logger != nil {
		s.Logger.Info("trustd: signing a server certificate", zap.Stringer("peer", remote.Addr),
			zap.Strings("dns_names", request.DNSNames), zap.Int("ip_addresses", len(request.IPAddresses)))
	}

	opts := []x509.Option{
		x509.KeyUsage(stdx509.KeyUsageDigitalSignature),
		x509.ExtKeyUsage([]stdx509.ExtKeyUsage{stdx509.ExtKeyUsageServerAuth}),
	}

	if len(request.Subject.Organization) > 0 {
		opts = append(opts, x509.OverrideSubject(func(subject *pkix.Name) { subject.Organization = nil }))
	}

	signed, err := x509.NewCertificateFromCSRBytes(s.CA.Crt, s.CA.Key, in.GetCsr(), opts...)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "failed to sign CSR: %s", err)
	}

	cas := make([][]byte, 0, len(s.AcceptedCAs))
	for _, c := range s.AcceptedCAs {
		cas = append(cas, c.Crt)
	}

	return &securityapi.CertificateResponse{Ca: bytes.Join(cas, nil), Crt: signed.X509CertificatePEM}, nil
}

// Identity asks the trustd of endpoints (hosts, port 50001 unless given)
// to sign csr, presenting token and verifying trustd against acceptedCAs,
// as a worker's machined does. It returns the CAs trustd answered with and
// the signed certificate.
func Identity(
	ctx context.Context, token string, endpoints []string, acceptedCAs []*x509.PEMEncodedCertificate, csr *x509.CertificateSigningRequest,
) (ca, crt []byte, err error) {
	if len(endpoints) == 0 {
		return nil, nil, errors.New("at least one root of trust endpoint is required")
	}

	endpoints = resolver.EnsureEndpointsHavePorts(endpoints, constants.TrustdPort)

	pool := stdx509.NewCertPool()
	for _, c := range acceptedCAs {
		pool.AppendCertsFromPEM(c.Crt)
	}

	conn, err := grpc.NewClient(fmt.Sprintf("%s:///%s", resolver.RoundRobinResolverScheme, strings.Join(endpoints, ",")),
		grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12})),
		grpc.WithPerRPCCredentials(tokenCredentials(token)),
	)
	if err != nil {
		return nil, nil, fmt.Errorf("connecting to trustd: %w", err)
	}
	defer conn.Close() //nolint:errcheck

	client := securityapi.NewSecurityServiceClient(conn)
	req := &securityapi.CertificateRequest{Csr: csr.X509CertificateRequestPEM}

	ctx, cancel := context.WithTimeout(ctx, identityTimeout)
	defer cancel()

	err = retry.Exponential(identityTimeout,
		retry.WithAttemptTimeout(attemptTimeout),
		retry.WithUnits(retryUnit),
		retry.WithJitter(retryJitter),
	).RetryWithContext(ctx, func(ctx context.Context) error {
		resp, err := client.Certificate(ctx, req)
		if err != nil {
			return retry.ExpectedError(err)
		}

		ca, crt = resp.GetCa(), resp.GetCrt()

		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("getting a certificate from trustd: %w", err)
	}

	return ca, crt, nil
}

// tokenCredentials sends the machine token with every call
// (basic.NewTokenCredentials).
type tokenCredentials string

func (t tokenCredentials) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{tokenKey: string(t)}, nil
}

func (tokenCredentials) RequireTransportSecurity() bool { return true }
