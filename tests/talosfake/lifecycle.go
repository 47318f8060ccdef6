package talosfake

import (
	"context"
	"strings"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"github.com/siderolabs/talos/pkg/machinery/role"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Lifecycle answers the calls that change the machine: machined runs them
// as sequences (apply the configuration, reboot, reset) that outlive the
// call, so an implementation answers at once and acts afterwards.
type Lifecycle interface {
	ApplyConfiguration(ctx context.Context, req *machine.ApplyConfigurationRequest) (*machine.ApplyConfiguration, error)
	Reboot(ctx context.Context, req *machine.RebootRequest) (*machine.Reboot, error)
	Reset(ctx context.Context, req *machine.ResetRequest) (*machine.Reset, error)
}

// rules are the roles machined requires per method
// (internal/app/machined/pkg/system/services/machined.go), for the methods
// the fake serves. A method not listed is refused, as machined refuses it.
var rules = map[string]role.Set{
	"/machine.MachineService/ApplyConfiguration": role.MakeSet(role.Admin, role.Reader), // Reader only in maintenance: checked in the handler
	"/machine.MachineService/Bootstrap":          role.MakeSet(role.Admin),
	"/machine.MachineService/EtcdMemberList":     role.MakeSet(role.Admin, role.Operator, role.Reader, role.EtcdBackup),
	"/machine.MachineService/List":               role.MakeSet(role.Admin, role.Operator, role.Reader),
	"/machine.MachineService/Reboot":             role.MakeSet(role.Admin, role.Operator),
	"/machine.MachineService/Reset":              role.MakeSet(role.Admin),
	"/machine.MachineService/SystemStat":         role.MakeSet(role.Admin, role.Operator, role.Reader),
	"/machine.MachineService/Version":            role.MakeSet(role.Admin, role.Operator, role.Reader),
	"/cosi.resource.State/Get":                   role.MakeSet(role.Admin, role.Operator, role.Reader),
	"/cosi.resource.State/List":                  role.MakeSet(role.Admin, role.Operator, role.Reader),
	"/cosi.resource.State/Watch":                 role.MakeSet(role.Admin, role.Operator, role.Reader),
	"/cosi.resource.State/Create":                role.MakeSet(role.Admin),
	"/cosi.resource.State/Update":                role.MakeSet(role.Admin),
	"/cosi.resource.State/Destroy":               role.MakeSet(role.Admin),
}

// errNotAuthorized is machined's authz.ErrNotAuthorized.
var errNotAuthorized = status.Error(codes.PermissionDenied, "not authorized")

// authorize checks the caller's roles against rules, as machined's authz
// middleware does: os:admin may call everything.
func authorize(ctx context.Context, method string) error {
	roles := rolesOf(ctx)
	if roles.Includes(role.Admin) {
		return nil
	}

	allowed, ok := rules[method]
	if !ok && strings.HasPrefix(method, "/cosi.resource.State/") {
		allowed, ok = rules["/cosi.resource.State/Get"], true
	}

	if !ok {
		return errNotAuthorized
	}

	if roles.IncludesAny(allowed) {
		return nil
	}

	return errNotAuthorized
}

func authorizeUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := authorize(ctx, info.FullMethod); err != nil {
		return nil, err
	}

	return handler(ctx, req)
}

func authorizeStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if err := authorize(ss.Context(), info.FullMethod); err != nil {
		return err
	}

	return handler(srv, ss)
}

// ApplyConfiguration implements machine.MachineServiceServer: machined
// outside maintenance takes it from os:admin only.
func (n *Node) ApplyConfiguration(ctx context.Context, req *machine.ApplyConfigurationRequest) (*machine.ApplyConfigurationResponse, error) {
	if n.opts.Lifecycle == nil {
		return n.recordApply(ctx, req)
	}

	if !hasRole(ctx, role.Admin) {
		return nil, errNotAuthorized
	}

	reply, err := n.opts.Lifecycle.ApplyConfiguration(ctx, req)
	if err != nil {
		return nil, err
	}

	reply.Metadata = n.metadata()

	return &machine.ApplyConfigurationResponse{Messages: []*machine.ApplyConfiguration{reply}}, nil
}

// Reboot implements machine.MachineServiceServer.
func (n *Node) Reboot(ctx context.Context, req *machine.RebootRequest) (*machine.RebootResponse, error) {
	if n.opts.Lifecycle == nil {
		return nil, status.Error(codes.Unimplemented, "Reboot is not implemented by this fake")
	}

	reply, err := n.opts.Lifecycle.Reboot(ctx, req)
	if err != nil {
		return nil, err
	}

	reply.Metadata = n.metadata()

	return &machine.RebootResponse{Messages: []*machine.Reboot{reply}}, nil
}

// Reset implements machine.MachineServiceServer.
func (n *Node) Reset(ctx context.Context, req *machine.ResetRequest) (*machine.ResetResponse, error) {
	if n.opts.Lifecycle == nil {
		return n.recordReset(ctx, req)
	}

	reply, err := n.opts.Lifecycle.Reset(ctx, req)
	if err != nil {
		return nil, err
	}

	reply.Metadata = n.metadata()

	return &machine.ResetResponse{Messages: []*machine.Reset{reply}}, nil
}
