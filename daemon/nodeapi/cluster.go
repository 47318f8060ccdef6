package nodeapi

import (
	"context"
	"errors"
	"fmt"

	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sovra-dev/sovra/daemon/membership"
	"github.com/sovra-dev/sovra/daemon/nodeauth"
	pb "github.com/sovra-dev/sovra/internal/nodeapi"
)

// clusterHandler serves the ClusterService: every call is authenticated by
// the node credential (package nodeauth, the server's interceptors).
type clusterHandler struct {
	pb.UnimplementedClusterServiceServer
	svc    *membership.Service
	logger *zap.Logger
}

func newClusterHandler(svc *membership.Service, logger *zap.Logger) *clusterHandler {
	return &clusterHandler{svc: svc, logger: logger}
}

// identity is the authenticated caller of a call.
func (h *clusterHandler) identity(ctx context.Context) (membership.Identity, error) {
	id, err := nodeauth.Require(ctx)
	if err != nil {
		return membership.Identity{}, err
	}
	return membership.Identity{Node: id.Node, UID: id.UID}, nil
}

func (h *clusterHandler) ListMembers(ctx context.Context, req *pb.ListMembersRequest) (*pb.ListMembersResponse, error) {
	id, err := h.identity(ctx)
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
	id, err := h.identity(ctx)
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
