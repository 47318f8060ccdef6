package nodeapi

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/sovra-dev/sovra/daemon/attestation"
	"github.com/sovra-dev/sovra/daemon/membership"
	pb "github.com/sovra-dev/sovra/internal/nodeapi"
)

// clusterHandler serves the ClusterService: every call is authenticated by
// the node credential, verified here against the node CA.
type clusterHandler struct {
	pb.UnimplementedClusterServiceServer
	svc *membership.Service
	// roots holds the node CA, the only issuer of node credentials.
	roots *x509.CertPool
	// now tells the time for certificate checks; nil is time.Now.
	now    func() time.Time
	logger *zap.Logger
}

func newClusterHandler(svc *membership.Service, nodeCA *x509.Certificate, logger *zap.Logger) *clusterHandler {
	roots := x509.NewCertPool()
	roots.AddCert(nodeCA)
	return &clusterHandler{svc: svc, roots: roots, logger: logger}
}

// errNoCredential is what a caller without a valid node credential hears.
const errNoCredential = "present the node credential a passing attestation returned (mutual TLS with the node client certificate)"

// identity authenticates the caller: the client certificate of the TLS
// connection must chain to the node CA, be valid now, be for client
// authentication and name a node.
func (h *clusterHandler) identity(ctx context.Context, call string) (membership.Identity, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return membership.Identity{}, status.Error(codes.Unauthenticated, errNoCredential)
	}
	from := ""
	if p.Addr != nil {
		from = p.Addr.String()
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.PeerCertificates) == 0 {
		h.logger.Warn("denied: call without a node credential", zap.String("call", call), zap.String("from", from))
		return membership.Identity{}, status.Error(codes.Unauthenticated, errNoCredential)
	}
	certs := info.State.PeerCertificates
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	now := time.Now
	if h.now != nil {
		now = h.now
	}
	leaf := certs[0]
	_, err := leaf.Verify(x509.VerifyOptions{
		Roots: h.roots, Intermediates: inter, CurrentTime: now(),
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err == nil && !slices.Contains(leaf.Subject.Organization, attestation.NodeOrganization) {
		err = errors.New("the certificate is not a node credential")
	}
	if err == nil && leaf.Subject.CommonName == "" {
		err = errors.New("the certificate names no node")
	}
	if err != nil {
		h.logger.Warn("denied: client certificate is not a valid node credential",
			zap.String("call", call), zap.String("from", from), zap.String("subject", leaf.Subject.String()), zap.Error(err))
		return membership.Identity{}, status.Error(codes.Unauthenticated, "the client certificate is not a valid node credential: "+errNoCredential)
	}
	return membership.Identity{Node: leaf.Subject.CommonName, NotBefore: leaf.NotBefore}, nil
}

func (h *clusterHandler) ListMembers(ctx context.Context, req *pb.ListMembersRequest) (*pb.ListMembersResponse, error) {
	id, err := h.identity(ctx, "ListMembers")
	if err != nil {
		return nil, err
	}
	cluster, members, err := h.svc.Members(ctx, id, req.GetAddress())
	if err != nil {
		return nil, h.toStatus("membership", id, err)
	}
	resp := &pb.ListMembersResponse{Cluster: cluster}
	lease, found, err := h.svc.Holder(ctx, cluster)
	if err != nil {
		return nil, h.toStatus("membership", id, err)
	}
	if found && (lease.Phase == membership.PhaseBootstrapping || lease.Phase == membership.PhaseBootstrapped) {
		resp.BootstrapAddress = lease.HolderAddress
	}
	for _, m := range members {
		resp.Members = append(resp.Members, &pb.Member{
			Node: m.Node, Hostname: m.Hostname, Address: m.Address, Addresses: m.Addresses, Self: m.Self,
		})
	}
	return resp, nil
}

// phases maps the wire phases to the service's.
var phases = map[pb.BootstrapPhase]membership.Phase{
	pb.BootstrapPhase_BOOTSTRAP_PHASE_HELD:          membership.PhaseHeld,
	pb.BootstrapPhase_BOOTSTRAP_PHASE_BOOTSTRAPPING: membership.PhaseBootstrapping,
	pb.BootstrapPhase_BOOTSTRAP_PHASE_BOOTSTRAPPED:  membership.PhaseBootstrapped,
}

func wirePhase(p membership.Phase) pb.BootstrapPhase {
	for w, s := range phases {
		if s == p {
			return w
		}
	}
	return pb.BootstrapPhase_BOOTSTRAP_PHASE_UNSPECIFIED
}

func (h *clusterHandler) BootstrapLease(ctx context.Context, req *pb.BootstrapLeaseRequest) (*pb.BootstrapLeaseResponse, error) {
	id, err := h.identity(ctx, "BootstrapLease")
	if err != nil {
		return nil, err
	}
	want, ok := phases[req.GetPhase()]
	if !ok {
		return nil, status.Errorf(codes.InvalidArgument, "bootstrap lease: phase %s: ask for HELD, BOOTSTRAPPING or BOOTSTRAPPED", req.GetPhase())
	}
	d, err := h.svc.BootstrapLease(ctx, id, want, req.GetAddress())
	if err != nil {
		return nil, h.toStatus("bootstrap lease", id, err)
	}
	resp := &pb.BootstrapLeaseResponse{
		Granted: d.Granted, Cluster: d.Cluster, Holder: d.Lease.Holder, HolderAddress: d.Lease.HolderAddress,
		Phase: wirePhase(d.Lease.Phase), Message: d.Message,
	}
	if d.Lease.Phase == membership.PhaseHeld {
		resp.ExpiresUnix = d.Lease.Expires().Unix()
	}
	return resp, nil
}

// toStatus maps membership errors to gRPC codes with a message that says
// what to do; errors that are not the node's fault are logged, not detailed.
func (h *clusterHandler) toStatus(what string, id membership.Identity, err error) error {
	switch {
	case errors.Is(err, membership.ErrInvalid):
		return status.Errorf(codes.InvalidArgument, "%s: %v", what, err)
	case errors.Is(err, membership.ErrNotEnrolled):
		h.logger.Warn("denied: credential of a node that is not enrolled", zap.String("call", what), zap.String("node", id.Node))
		return status.Errorf(codes.PermissionDenied, "%s: %v; enroll and attest again", what, err)
	case errors.Is(err, membership.ErrNotAttested), errors.Is(err, membership.ErrNoCluster):
		h.logger.Warn("denied", zap.String("call", what), zap.String("node", id.Node), zap.Error(err))
		return status.Errorf(codes.PermissionDenied, "%s: %v", what, err)
	case errors.Is(err, membership.ErrConflict):
		return status.Errorf(codes.Aborted, "%s: concurrent update; retry", what)
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return status.Errorf(codes.DeadlineExceeded, "%s: timed out; retry", what)
	default:
		h.logger.Error(what+" failed", zap.String("node", id.Node), zap.Error(err))
		return status.Error(codes.Unavailable, fmt.Sprintf("%s: the daemon could not complete the request; retry later", what))
	}
}
