// Package talosfake is a fake Talos node for the bootstrap stories and the
// Talos API of the boot simulator (package bootsim): the real machinery
// MachineService (Version, SystemStat, Bootstrap, EtcdMemberList, List, and
// ApplyConfiguration, Reboot and Reset handed to a Lifecycle) and the real
// COSI state server over an in-memory state, behind apid-like mutual TLS with
// a server certificate from the cluster's Talos CA (or one given, as trustd
// issues a worker's). Like apid it routes calls that name other nodes in
// their gRPC metadata ("nodes", "node") to those nodes' fakes, and like
// machined it checks the caller's roles per method. It is built only from
// the upstream Talos protobufs and libraries, and it records every Bootstrap
// call.
//
// Talos sources imitated (siderolabs/talos v1.13.9):
//   - internal/app/machined/internal/server/v1alpha1/v1alpha1_server.go
//     (the MachineService handlers);
//   - internal/app/machined/pkg/system/services/machined.go (the roles each
//     method requires);
//   - internal/app/apid/pkg/director, pkg/backend/apid.go (node routing);
//   - internal/app/machined/pkg/controllers/secrets/api.go (apid's
//     certificates: a control plane issues its own from machine.ca; clients
//     must present a certificate from machine.ca or machine.acceptedCAs).
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
	"sync/atomic"
	"time"

	"github.com/cosi-project/runtime/api/v1alpha1"
	"github.com/cosi-project/runtime/pkg/resource"
	"github.com/cosi-project/runtime/pkg/resource/meta"
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
	defaultArch    = "amd64"
	serverCertTTL  = 24 * time.Hour
	certBackdate   = time.Minute
	defaultEtcdGap = 200 * time.Millisecond
	// gracefulStop bounds how long Serve waits for calls in flight when
	// its context ends (a reply to Reboot or Reset is one).
	gracefulStop = 2 * time.Second
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
	// clients must present a certificate it (or one of AcceptedCAs) signed.
	// Without a key (a worker's machine.ca) ServerCert must be set, and
	// calls routed to other nodes are refused.
	CA *x509.PEMEncodedCertificateAndKey
	// AcceptedCAs are more CAs whose client certificates are accepted
	// (machine.acceptedCAs).
	AcceptedCAs []*x509.PEMEncodedCertificate
	// ServerCert, when set, is the server certificate (a worker's, from
	// trustd) instead of one issued from CA.
	ServerCert *x509.PEMEncodedCertificateAndKey
	// CertSANs are more names and addresses for the issued server
	// certificate (machine.certSANs, the hostname); Address and 127.0.0.1
	// are always in it.
	CertSANs []string
	// MachineType is controlplane, init or worker.
	MachineType machinetype.Type
	// BootTime is what SystemStat reports.
	BootTime time.Time
	// Hostname is reported by Version and in the etcd member.
	Hostname string
	// Arch is what Version reports; empty means amd64.
	Arch string
	// StateDir, when set, keeps the etcd data marker and the Bootstrap
	// log across restarts of the fake.
	StateDir string
	// State is the COSI state to serve; nil means a new in-memory one.
	State state.State
	// Resources are created in the COSI state at start (hardware,
	// addresses), with a resource definition per type so that clients can
	// resolve aliases (talosctl get cpus).
	Resources []resource.Resource
	// Lifecycle answers ApplyConfiguration, Reboot and Reset; nil records
	// ApplyConfiguration and Reset (ApplyCalls, ResetCalls, OnApply,
	// OnReset) and answers Reboot Unimplemented.
	Lifecycle Lifecycle
	// Hardware is what the node's hardware and block resources describe;
	// nil means none (the node publishes no Processor, MemoryModule or Disk).
	Hardware *Hardware
	// OnApply, when set, is called with every ApplyConfiguration the node
	// records, after it was recorded; an error fails the call with
	// InvalidArgument, as machined's validation does.
	OnApply func(ApplyCall) error
	// OnReset, when set, is called with every Reset the node records.
	OnReset func(ResetCall)
	// EtcdData starts the node with etcd data, as after a bootstrap.
	EtcdData bool
	// TimeUnsynced makes Talos report its clock not in sync yet.
	TimeUnsynced bool
	// EtcdStartDelay is the time etcd takes to answer after a Bootstrap;
	// zero means 200ms.
	EtcdStartDelay time.Duration
	// Logger receives a line per call; nil means none.
	Logger *zap.Logger
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
	// serverTLS is the server side of the Talos API; SetPKI replaces it.
	serverTLS atomic.Pointer[tls.Config]
	// peerTLS is the client side of calls forwarded to other nodes; nil
	// when the CA has no key.
	peerTLS atomic.Pointer[tls.Config]

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

	if opts.Arch == "" {
		opts.Arch = defaultArch
	}

	st := opts.State
	if st == nil {
		st = state.WrapCore(namespaced.NewState(inmem.Build))
	}

	n := &Node{opts: opts, state: st}

	if err := n.SetPKI(opts.CA, opts.AcceptedCAs, opts.ServerCert); err != nil {
		return nil, err
	}

	mt := config.NewMachineType()
	mt.SetMachineType(opts.MachineType)

	ts := timeres.NewStatus()
	ts.TypedSpec().Synced = !opts.TimeUnsynced

	if err := CreateResources(context.Background(), n.state, append([]resource.Resource{mt, ts}, opts.Resources...)...); err != nil {
		return nil, err
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

// SetPKI replaces the API's certificates, as machined does when the
// machine's CA, accepted CAs or certificate SANs change: new connections
// use them, connections already open keep theirs. ca is the issuing CA
// (its key may be empty when serverCert is given); clients must present a
// certificate from ca or one of accepted.
func (n *Node) SetPKI(ca *x509.PEMEncodedCertificateAndKey, accepted []*x509.PEMEncodedCertificate, serverCert *x509.PEMEncodedCertificateAndKey) error {
	serverTLS, err := serverTLSConfig(ca, accepted, serverCert, n.opts.Address, n.opts.CertSANs)
	if err != nil {
		return err
	}

	var peerTLS *tls.Config

	if ca != nil && len(ca.Key) > 0 {
		if peerTLS, err = peerTLSConfig(ca); err != nil {
			return err
		}
	}

	n.serverTLS.Store(serverTLS)
	n.peerTLS.Store(peerTLS)

	return nil
}

// serverTLSConfig is apid's server side: serverCert, or a certificate for
// addr (and 127.0.0.1 and sans) issued from ca; clients must present a
// certificate from ca or one of accepted.
func serverTLSConfig(
	ca *x509.PEMEncodedCertificateAndKey, accepted []*x509.PEMEncodedCertificate,
	serverCert *x509.PEMEncodedCertificateAndKey, addr netip.Addr, sans []string,
) (*tls.Config, error) {
	if serverCert == nil {
		if ca == nil || len(ca.Key) == 0 {
			return nil, errors.New("issuing the server certificate: the Talos CA has no key and no server certificate was given")
		}

		var err error
		if serverCert, err = IssueServerCertificate(ca, addr, sans); err != nil {
			return nil, err
		}
	}

	cert, err := tls.X509KeyPair(serverCert.Crt, serverCert.Key)
	if err != nil {
		return nil, fmt.Errorf("loading the server certificate: %w", err)
	}

	pool := stdx509.NewCertPool()

	if ca != nil && len(ca.Crt) > 0 && !pool.AppendCertsFromPEM(ca.Crt) {
		return nil, errors.New("loading the Talos CA: not a PEM certificate")
	}

	for _, c := range accepted {
		if !pool.AppendCertsFromPEM(c.Crt) {
			return nil, errors.New("loading an accepted CA: not a PEM certificate")
		}
	}

	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS12,
		// gRPC clients require the server to negotiate HTTP/2 by ALPN;
		// credentials.NewTLS adds it only to the outer config.
		NextProtos: []string{"h2"},
	}, nil
}

// IssueServerCertificate issues a server certificate from ca for addr,
// 127.0.0.1 and sans (addresses or DNS names), as machined does for apid
// (and trustd) on a control-plane node.
func IssueServerCertificate(ca *x509.PEMEncodedCertificateAndKey, addr netip.Addr, sans []string) (*x509.PEMEncodedCertificateAndKey, error) {
	authority, err := x509.NewCertificateAuthorityFromCertificateAndKey(ca)
	if err != nil {
		return nil, fmt.Errorf("loading the Talos CA: %w", err)
	}

	ips := []net.IP{net.IPv4(127, 0, 0, 1)}
	if addr.IsValid() {
		ips = append(ips, addr.AsSlice())
	}

	var names []string

	for _, san := range sans {
		if ip, err := netip.ParseAddr(san); err == nil {
			ips = append(ips, ip.AsSlice())
		} else if san != "" {
			names = append(names, san)
		}
	}

	now := time.Now()

	kp, err := x509.NewKeyPair(authority,
		x509.CommonName(addr.String()),
		x509.IPAddresses(ips),
		x509.DNSNames(names),
		x509.NotBefore(now.Add(-certBackdate)),
		x509.NotAfter(now.Add(serverCertTTL)),
		x509.KeyUsage(stdx509.KeyUsageDigitalSignature),
		x509.ExtKeyUsage([]stdx509.ExtKeyUsage{stdx509.ExtKeyUsageServerAuth}),
	)
	if err != nil {
		return nil, fmt.Errorf("issuing the server certificate: %w", err)
	}

	return x509.NewCertificateAndKeyFromKeyPair(kp), nil
}

// CreateResources creates res in st, with a resource definition for each
// of their types (as Talos registers them), so that clients resolve type
// aliases. A resource that exists already is left as it is.
func CreateResources(ctx context.Context, st state.State, res ...resource.Resource) error {
	defined := map[resource.Type]bool{}

	for _, r := range res {
		if err := st.Create(ctx, r); err != nil && !state.IsConflictError(err) {
			return fmt.Errorf("creating resource %s: %w", r.Metadata(), err)
		}

		typ := r.Metadata().Type()
		if defined[typ] {
			continue
		}

		defined[typ] = true

		withRD, ok := r.(meta.ResourceDefinitionProvider)
		if !ok {
			continue
		}

		rd, err := meta.NewResourceDefinition(withRD.ResourceDefinition())
		if err != nil {
			return fmt.Errorf("defining resource type %s: %w", typ, err)
		}

		if err := st.Create(ctx, rd); err != nil && !state.IsConflictError(err) {
			return fmt.Errorf("defining resource type %s: %w", typ, err)
		}
	}

	return nil
}

// State is the node's COSI state, served to clients: the simulator keeps
// its resources (addresses, hostname) current through it.
func (n *Node) State() state.State { return n.state }

// Serve serves the Talos API on lis until ctx is done; calls in flight then
// get a short grace to finish.
func (n *Node) Serve(ctx context.Context, lis net.Listener) error {
	creds := credentials.NewTLS(&tls.Config{
		MinVersion: tls.VersionTLS12,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			return n.serverTLS.Load(), nil
		},
	})

	srv := grpc.NewServer(grpc.Creds(creds),
		grpc.ChainUnaryInterceptor(n.routeUnary, authorizeUnary), grpc.ChainStreamInterceptor(n.routeStream, authorizeStream))
	machine.RegisterMachineServiceServer(srv, n)
	v1alpha1.RegisterStateServer(srv, server.NewState(n.state))

	defer n.closePeers()

	go func() {
		<-ctx.Done()

		stopped := make(chan struct{})

		go func() {
			srv.GracefulStop()
			close(stopped)
		}()

		select {
		case <-stopped:
		case <-time.After(gracefulStop):
			srv.Stop()
		}
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
		Version:  &machine.VersionInfo{Tag: talosVersion, Arch: n.opts.Arch, Os: "Talos"},
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

	// A call that could not be recorded changed nothing (no etcd data).
	n.mu.Lock()
	call.Accepted = !n.etcdData
	if err := n.record(call); err != nil {
		n.mu.Unlock()

		return nil, status.Error(codes.Internal, err.Error())
	}
	n.calls = append(n.calls, call)
	n.etcdData = true
	n.mu.Unlock()

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

	// /var/lib/etcd: a directory volume Talos makes on a control plane's
	// EPHEMERAL (block/internal/volumes/volumeconfig/system_volumes.go),
	// made here when first written to, once EPHEMERAL is mounted.
	if err := os.MkdirAll(n.opts.StateDir, 0o700); err != nil {
		return fmt.Errorf("creating the etcd data directory: %w", err)
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
