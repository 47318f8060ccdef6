// Package talosfake is a fake Talos node for the bootstrap stories: the real
// machinery MachineService (Version, SystemStat, Bootstrap, EtcdMemberList,
// List, Memory, ApplyConfiguration, Reset) and the real COSI state server over an in-memory state, behind
// apid-like mutual TLS with a server certificate from the cluster's Talos CA.
// Like apid it routes calls that name other nodes in their gRPC metadata
// ("nodes", "node") to those nodes' fakes. It is built only from the
// upstream Talos protobufs and libraries, and it records every Bootstrap
// call.
package talosfake

import (
	"context"
	"crypto/tls"
	stdx509 "crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cosi-project/runtime/api/v1alpha1"
	"github.com/cosi-project/runtime/pkg/state"
	"github.com/cosi-project/runtime/pkg/state/impl/inmem"
	"github.com/cosi-project/runtime/pkg/state/impl/namespaced"
	"github.com/cosi-project/runtime/pkg/state/protobuf/server"
	"github.com/siderolabs/crypto/x509"
	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	machinetype "github.com/siderolabs/talos/pkg/machinery/config/machine"
	"github.com/siderolabs/talos/pkg/machinery/constants"
	"github.com/siderolabs/talos/pkg/machinery/resources/config"
	"github.com/siderolabs/talos/pkg/machinery/resources/etcd"
	timeres "github.com/siderolabs/talos/pkg/machinery/resources/time"
	"github.com/siderolabs/talos/pkg/machinery/role"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
)

// Files in the state directory.
const (
	// EtcdDataFile marks that etcd data exists (the fake's /var/lib/etcd/member).
	EtcdDataFile = "etcd-member"
	// BootstrapLogFile gets one line per Bootstrap call.
	BootstrapLogFile = "bootstrap.log"

	etcdDataDir    = "/var/lib/etcd/member"
	talosVersion   = "v1.13.0"
	serverCertTTL  = 24 * time.Hour
	certBackdate   = time.Minute
	defaultEtcdGap = 200 * time.Millisecond
)

// Options describe one fake node.
type Options struct {
	// Address is the node's address: the server certificate names it, a
	// routed call naming it is answered locally, and calls forwarded to
	// other nodes come from it when it can reach them.
	Address netip.Addr
	// APIPort is the port every node's fake serves the Talos API on: a call
	// routed to another node is forwarded to <node>:APIPort. Zero means
	// 50000, apid's port.
	APIPort int
	// CA is the cluster's Talos (OS) CA; its key signs the server
	// certificate and the client certificate for forwarded calls, and
	// clients must present a certificate it signed.
	CA *x509.PEMEncodedCertificateAndKey
	// AcceptedCAs (PEM) also sign client certificates the node accepts, as
	// machine.acceptedCAs does in Talos (a released configuration lists the
	// agent CA there).
	AcceptedCAs [][]byte
	// MachineType is controlplane, init or worker.
	MachineType machinetype.Type
	// BootTime is what SystemStat reports.
	BootTime time.Time
	// Hostname is reported by Version and in the etcd member.
	Hostname string
	// StateDir, when set, keeps the etcd data marker and the Bootstrap
	// log across restarts of the fake.
	StateDir string
	// EtcdData starts the node with etcd data, as after a bootstrap.
	EtcdData bool
	// TimeUnsynced makes Talos report its clock not in sync yet.
	TimeUnsynced bool
	// EtcdStartDelay is the time etcd takes to answer after a Bootstrap;
	// zero means 200ms.
	EtcdStartDelay time.Duration
	// Logger receives a line per call; nil means none.
	Logger *zap.Logger
	// Hardware is what the node's hardware and block resources describe;
	// nil means none (the node publishes no Processor, MemoryModule or Disk).
	Hardware *Hardware
	// OnApply, when set, is called with every ApplyConfiguration the node
	// accepts, after it was recorded; an error fails the call with
	// InvalidArgument, as machined's validation does.
	OnApply func(ApplyCall) error
	// OnReset, when set, is called with every Reset the node accepts.
	OnReset func(ResetCall)
}

// BootstrapCall is one recorded Bootstrap call.
type BootstrapCall struct {
	Time time.Time
	// Client is the caller's address: for a call another node forwarded,
	// that node.
	Client string
	// Origin is, for a forwarded call, the address of the client that
	// called the forwarding node; empty for a direct call.
	Origin string
	// Accepted is false when the call was answered AlreadyExists.
	Accepted bool
}

// Node is a fake Talos node.
type Node struct {
	machine.UnimplementedMachineServiceServer

	opts  Options
	state state.State
	creds credentials.TransportCredentials
	// peerTLS is the client side of calls forwarded to other nodes.
	peerTLS *tls.Config

	// peersMu guards peers.
	peersMu sync.Mutex
	// peers holds a connection per node calls were forwarded to; Serve
	// closes them when it returns.
	peers map[string]*grpc.ClientConn

	// mu guards the fields below.
	mu          sync.Mutex
	etcdData    bool
	etcdRunning bool
	calls       []BootstrapCall
	applies     []ApplyCall
	resets      []ResetCall
}

// New returns a fake node with a fresh server certificate.
func New(opts Options) (*Node, error) {
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}

	if opts.EtcdStartDelay == 0 {
		opts.EtcdStartDelay = defaultEtcdGap
	}

	if opts.APIPort == 0 {
		opts.APIPort = constants.ApidPort
	}

	creds, err := serverCredentials(opts.CA, opts.Address, opts.AcceptedCAs)
	if err != nil {
		return nil, err
	}

	peerTLS, err := peerTLSConfig(opts.CA)
	if err != nil {
		return nil, err
	}

	n := &Node{opts: opts, creds: creds, peerTLS: peerTLS, state: state.WrapCore(namespaced.NewState(inmem.Build))}

	mt := config.NewMachineType()
	mt.SetMachineType(opts.MachineType)

	if err := n.state.Create(context.Background(), mt); err != nil {
		return nil, fmt.Errorf("creating the machine type resource: %w", err)
	}

	ts := timeres.NewStatus()
	ts.TypedSpec().Synced = !opts.TimeUnsynced

	if err := n.state.Create(context.Background(), ts); err != nil {
		return nil, fmt.Errorf("creating the time status resource: %w", err)
	}

	if err := n.publishHardware(opts.Hardware); err != nil {
		return nil, err
	}

	n.etcdData = opts.EtcdData
	if opts.StateDir != "" {
		if _, err := os.Stat(filepath.Join(opts.StateDir, EtcdDataFile)); err == nil {
			n.etcdData = true
		}
	}

	if n.etcdData {
		n.startEtcd()
	}

	return n, nil
}

// serverCredentials issues an apid-like server certificate for addr from ca
// and requires clients to present a certificate from the same CA or one of
// accepted (machine.acceptedCAs).
func serverCredentials(ca *x509.PEMEncodedCertificateAndKey, addr netip.Addr, accepted [][]byte) (credentials.TransportCredentials, error) {
	authority, err := x509.NewCertificateAuthorityFromCertificateAndKey(ca)
	if err != nil {
		return nil, fmt.Errorf("loading the Talos CA: %w", err)
	}

	now := time.Now()

	kp, err := x509.NewKeyPair(authority,
		x509.CommonName(addr.String()),
		x509.IPAddresses([]net.IP{addr.AsSlice(), net.IPv4(127, 0, 0, 1)}),
		x509.NotBefore(now.Add(-certBackdate)),
		x509.NotAfter(now.Add(serverCertTTL)),
		x509.KeyUsage(stdx509.KeyUsageDigitalSignature),
		x509.ExtKeyUsage([]stdx509.ExtKeyUsage{stdx509.ExtKeyUsageServerAuth}),
	)
	if err != nil {
		return nil, fmt.Errorf("issuing the server certificate: %w", err)
	}

	pool := stdx509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca.Crt) {
		return nil, errors.New("loading the Talos CA: not a PEM certificate")
	}

	for _, a := range accepted {
		if !pool.AppendCertsFromPEM(a) {
			return nil, errors.New("loading an accepted CA: not a PEM certificate")
		}
	}

	return credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{*kp.Certificate},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS12,
	}), nil
}

// Serve serves the Talos API on lis until ctx is done.
func (n *Node) Serve(ctx context.Context, lis net.Listener) error {
	srv := grpc.NewServer(grpc.Creds(n.creds),
		grpc.ChainUnaryInterceptor(n.routeUnary), grpc.ChainStreamInterceptor(n.routeStream))
	machine.RegisterMachineServiceServer(srv, n)
	v1alpha1.RegisterStateServer(srv, server.NewState(n.state))

	defer n.closePeers()

	go func() {
		<-ctx.Done()
		srv.Stop()
	}()

	if err := srv.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("serving the Talos API: %w", err)
	}

	return nil
}

// BootstrapCalls returns the recorded Bootstrap calls.
func (n *Node) BootstrapCalls() []BootstrapCall {
	n.mu.Lock()
	defer n.mu.Unlock()

	return slices.Clone(n.calls)
}

// EtcdRunning reports whether the fake's etcd answers.
func (n *Node) EtcdRunning() bool {
	n.mu.Lock()
	defer n.mu.Unlock()

	return n.etcdRunning
}

func (n *Node) metadata() *common.Metadata { return &common.Metadata{Hostname: n.opts.Hostname} }

// Version implements machine.MachineServiceServer.
func (n *Node) Version(context.Context, *emptypb.Empty) (*machine.VersionResponse, error) {
	return &machine.VersionResponse{Messages: []*machine.Version{{
		Metadata: n.metadata(),
		Version:  &machine.VersionInfo{Tag: talosVersion, Arch: "amd64", Os: "Talos"},
		Platform: &machine.PlatformInfo{Name: "metal", Mode: "metal"},
	}}}, nil
}

// SystemStat implements machine.MachineServiceServer.
func (n *Node) SystemStat(context.Context, *emptypb.Empty) (*machine.SystemStatResponse, error) {
	return &machine.SystemStatResponse{Messages: []*machine.SystemStat{{
		Metadata: n.metadata(),
		BootTime: uint64(n.opts.BootTime.Unix()), //nolint:gosec
	}}}, nil
}

// Bootstrap implements machine.MachineServiceServer like machined: refused
// on workers and without os:admin, AlreadyExists once etcd data exists.
func (n *Node) Bootstrap(ctx context.Context, _ *machine.BootstrapRequest) (*machine.BootstrapResponse, error) {
	if !hasRole(ctx, role.Admin) {
		return nil, status.Error(codes.PermissionDenied, "not authorized")
	}

	if !n.opts.MachineType.IsControlPlane() {
		return nil, status.Error(codes.FailedPrecondition, "bootstrap can only be performed on a control plane node")
	}

	call := BootstrapCall{Time: time.Now(), Client: "unknown"}
	if p, ok := peer.FromContext(ctx); ok {
		call.Client = p.Addr.String()
	}

	if md, ok := metadata.FromIncomingContext(ctx); ok && len(md.Get(proxyFromKey)) > 0 {
		call.Origin = strings.Join(md.Get(originKey), ",")
	}

	n.mu.Lock()
	call.Accepted = !n.etcdData
	n.calls = append(n.calls, call)
	n.etcdData = true
	n.mu.Unlock()

	if err := n.record(call); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}

	fields := []zap.Field{zap.String("client", call.Client), zap.String("origin", call.Origin)}

	if !call.Accepted {
		n.opts.Logger.Info("Bootstrap refused: etcd data directory is not empty", fields...)

		return nil, status.Error(codes.AlreadyExists, "etcd data directory is not empty")
	}

	n.opts.Logger.Info("Bootstrap accepted: etcd bootstrapping", fields...)

	time.AfterFunc(n.opts.EtcdStartDelay, n.startEtcd)

	return &machine.BootstrapResponse{Messages: []*machine.Bootstrap{{Metadata: n.metadata()}}}, nil
}

// record appends call to the Bootstrap log as
// "<time> accepted|already-exists <client>[ origin=<origin>]".
func (n *Node) record(call BootstrapCall) error {
	if n.opts.StateDir == "" {
		return nil
	}

	if call.Accepted {
		if err := os.WriteFile(filepath.Join(n.opts.StateDir, EtcdDataFile), nil, 0o600); err != nil {
			return fmt.Errorf("recording etcd data: %w", err)
		}
	}

	f, err := os.OpenFile(filepath.Join(n.opts.StateDir, BootstrapLogFile), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("recording the Bootstrap call: %w", err)
	}
	defer f.Close() //nolint:errcheck

	outcome := "accepted"
	if !call.Accepted {
		outcome = "already-exists"
	}

	line := fmt.Sprintf("%s %s %s", call.Time.UTC().Format(time.RFC3339Nano), outcome, call.Client)

	if call.Origin != "" {
		line += " origin=" + call.Origin
	}

	_, err = fmt.Fprintln(f, line)

	return err
}

func (n *Node) startEtcd() {
	n.mu.Lock()
	n.etcdRunning = true
	n.mu.Unlock()

	member := etcd.NewMember(etcd.NamespaceName, etcd.LocalMemberID)
	member.TypedSpec().MemberID = "1"

	if err := n.state.Create(context.Background(), member); err != nil && !state.IsConflictError(err) {
		n.opts.Logger.Warn("creating the etcd member resource", zap.Error(err))
	}
}

// EtcdMemberList implements machine.MachineServiceServer: Unavailable until
// etcd runs, then one member, this node.
func (n *Node) EtcdMemberList(context.Context, *machine.EtcdMemberListRequest) (*machine.EtcdMemberListResponse, error) {
	if !n.EtcdRunning() {
		return nil, status.Error(codes.Unavailable, "etcd is not running")
	}

	return &machine.EtcdMemberListResponse{Messages: []*machine.EtcdMembers{{
		Metadata: n.metadata(),
		Members: []*machine.EtcdMember{{
			Id:         1,
			Hostname:   n.opts.Hostname,
			PeerUrls:   []string{"https://" + net.JoinHostPort(n.opts.Address.String(), "2380")},
			ClientUrls: []string{"https://" + net.JoinHostPort(n.opts.Address.String(), "2379")},
		}},
	}}}, nil
}

// List implements machine.MachineServiceServer for the etcd data directory
// only, answering like machined does for a missing root.
func (n *Node) List(req *machine.ListRequest, stream machine.MachineService_ListServer) error {
	n.mu.Lock()
	exists := n.etcdData && req.GetRoot() == etcdDataDir
	n.mu.Unlock()

	if !exists {
		return status.Errorf(codes.Unknown, "lstat %s: no such file or directory", req.GetRoot())
	}

	return stream.Send(&machine.FileInfo{Metadata: n.metadata(), Name: req.GetRoot(), IsDir: true, Mode: uint32(os.ModeDir | 0o700)})
}
