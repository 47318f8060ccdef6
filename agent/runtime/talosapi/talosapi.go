// Package talosapi is the agent's adapter to the Talos API over mutual TLS
// with the talosconfig's client certificate. It implements the capability
// interfaces of the controllers: the discovery Prober, the node
// MachineTypeReader and the bootstrap Talos.
//
// It speaks to apid with the generated clients of the two APIs it uses, the
// machine service and the COSI state service, and decodes the two resources
// it reads (the machine type and the time status) from their protobuf specs.
// It does not link the machinery client or the machinery resource packages:
// those pull in the machine config types, CEL, OpenPGP and CNI, a third of
// the agent binary, for none of what the agent calls.
package talosapi

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	cosiapi "github.com/cosi-project/runtime/api/v1alpha1"
	"github.com/cosi-project/runtime/pkg/resource"
	"github.com/cosi-project/runtime/pkg/resource/protobuf"
	"github.com/cosi-project/runtime/pkg/state"
	cosiclient "github.com/cosi-project/runtime/pkg/state/protobuf/client"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	configpb "github.com/siderolabs/talos/pkg/machinery/api/resource/config"
	timepb "github.com/siderolabs/talos/pkg/machinery/api/resource/definitions/time"
	clientconfig "github.com/siderolabs/talos/pkg/machinery/client/config"
	machinetype "github.com/siderolabs/talos/pkg/machinery/config/machine"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"

	bootstrapctrl "github.com/sovra-dev/sovra/agent/controllers/bootstrap"
	discoveryctrl "github.com/sovra-dev/sovra/agent/controllers/discovery"
	"github.com/sovra-dev/sovra/agent/resources/discovery"
)

// EtcdDataDir is the directory whose presence means a node has etcd data;
// the Talos control-plane provider checks the same one.
const EtcdDataDir = "/var/lib/etcd/member"

// The Talos resources the agent reads, as machinery's resources/config
// (MachineType) and resources/time (Status) define them.
const (
	machineTypeNamespace = "config"
	machineTypeType      = "MachineTypes.config.talos.dev"
	machineTypeID        = "machine-type"
	timeStatusNamespace  = "runtime"
	timeStatusType       = "TimeStatuses.v1alpha1.talos.dev"
	timeStatusID         = "node"
)

// LoadTLS reads a talosconfig and returns the mutual-TLS configuration for
// the Talos API: the client certificate of its current context, and its CA as
// the only root for peers. Errors never contain key material.
func LoadTLS(path string) (*tls.Config, error) {
	// Not clientconfig.Open: given a path, it creates the file when missing.
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading talosconfig: %w", err)
	}
	defer f.Close() //nolint:errcheck

	cfg, err := clientconfig.ReadFrom(f)
	if err != nil {
		return nil, fmt.Errorf("reading talosconfig %s: %w", path, err)
	}

	name := cfg.Context
	ctx, ok := cfg.Contexts[name]

	if !ok || ctx == nil {
		return nil, fmt.Errorf("reading talosconfig %s: context %q not found", path, name)
	}

	var problems []error

	if ctx.CA == "" {
		problems = append(problems, errors.New("no CA: peers cannot be verified"))
	}

	if ctx.Crt == "" || ctx.Key == "" {
		problems = append(problems, errors.New("no client certificate and key"))
	}

	if len(problems) > 0 {
		return nil, fmt.Errorf("reading talosconfig %s, context %q: %w", path, name, errors.Join(problems...))
	}

	caPEM, err := base64.StdEncoding.DecodeString(ctx.CA)
	if err != nil {
		return nil, fmt.Errorf("reading talosconfig %s: decoding the CA: %w", path, err)
	}

	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("reading talosconfig %s: the CA is not a PEM certificate", path)
	}

	crt, err := clientCertificate(ctx)
	if err != nil {
		return nil, fmt.Errorf("reading talosconfig %s: loading the client certificate: %w", path, err)
	}

	return &tls.Config{
		RootCAs:      roots,
		Certificates: []tls.Certificate{crt},
		MinVersion:   tls.VersionTLS12,
	}, nil
}

// clientCertificate decodes the context's client certificate and key. Its
// errors name the step that failed, never the material.
func clientCertificate(ctx *clientconfig.Context) (tls.Certificate, error) {
	crt, err := base64.StdEncoding.DecodeString(ctx.Crt)
	if err != nil {
		return tls.Certificate{}, errors.New("the certificate is not base64")
	}

	key, err := base64.StdEncoding.DecodeString(ctx.Key)
	if err != nil {
		return tls.Certificate{}, errors.New("the key is not base64")
	}

	pair, err := tls.X509KeyPair(crt, key)
	if err != nil {
		return tls.Certificate{}, errors.New("the certificate and key are not a PEM key pair")
	}

	return pair, nil
}

// Client reaches the Talos API of any node by address.
type Client struct {
	// TLS is the mutual-TLS configuration from LoadTLS.
	TLS *tls.Config
	// PeerTLS, when set, is the mutual-TLS configuration for every node but
	// Local: on a provisioned control plane, TLS's certificate is accepted
	// by this node alone, and PeerTLS's (an os:reader one of the cluster's
	// Talos CA) by every node of the cluster.
	PeerTLS *tls.Config
	// Port is the apid port.
	Port int
	// Timeout bounds all the calls to one node.
	Timeout time.Duration
	// Local is this node's address, used by MachineType.
	Local netip.Addr
}

// tlsFor is the mutual-TLS configuration for the node at addr.
func (c *Client) tlsFor(addr netip.Addr) *tls.Config {
	cfg := c.TLS
	if c.PeerTLS != nil && addr != c.Local {
		cfg = c.PeerTLS
	}

	cfg = cfg.Clone()
	cfg.ServerName = addr.String()

	return cfg
}

func (c *Client) endpoint(addr netip.Addr) string {
	return net.JoinHostPort(addr.String(), strconv.Itoa(c.Port))
}

// node is a connection to one node's Talos API: its machine service and
// its COSI state (resources), as talosctl reaches them.
type node struct {
	conn    *grpc.ClientConn
	machine machine.MachineServiceClient
	cosi    state.State
}

func (n *node) Close() error { return n.conn.Close() }

// connect opens a connection to one node. It is lazy: the TLS handshake
// happens on the first call.
func (c *Client) connect(addr netip.Addr) (*node, error) {
	tlsConfig := c.tlsFor(addr)

	conn, err := grpc.NewClient(c.endpoint(addr), grpc.WithTransportCredentials(credentials.NewTLS(tlsConfig)))
	if err != nil {
		return nil, fmt.Errorf("connecting to the Talos API of %s: %w", addr, err)
	}

	return &node{
		conn:    conn,
		machine: machine.NewMachineServiceClient(conn),
		cosi:    state.WrapCore(cosiclient.NewAdapter(cosiapi.NewStateClient(conn))),
	}, nil
}

// protoSpec decodes a resource's protobuf spec into a message.
type protoSpec struct{ m proto.Message }

// UnmarshalProto implements protobuf.ResourceUnmarshaler.
func (s protoSpec) UnmarshalProto(_ *resource.Metadata, b []byte) error {
	return proto.Unmarshal(b, s.m)
}

// getSpec reads one resource and decodes its protobuf spec into spec. It
// takes the resource as apid sends it (a spec in protobuf), without the
// resource types of machinery.
func (n *node) getSpec(ctx context.Context, ns resource.Namespace, typ resource.Type, id resource.ID, spec proto.Message) error {
	r, err := n.cosi.Get(ctx, resource.NewMetadata(ns, typ, id, resource.VersionUndefined),
		state.WithGetUnmarshalOptions(state.WithSkipProtobufUnmarshal()))
	if err != nil {
		return err
	}

	raw, ok := r.(*protobuf.Resource)
	if !ok {
		return fmt.Errorf("reading %s: unexpected resource %T", typ, r)
	}

	if err := raw.Unmarshal(protoSpec{spec}); err != nil {
		return fmt.Errorf("decoding %s: %w", typ, err)
	}

	return nil
}

// machineType reads the node's machine type.
func (n *node) machineType(ctx context.Context) (machinetype.Type, error) {
	var spec configpb.MachineTypeSpec
	if err := n.getSpec(ctx, machineTypeNamespace, machineTypeType, machineTypeID, &spec); err != nil {
		return machinetype.TypeUnknown, err
	}

	return machinetype.Type(spec.GetMachineType()), nil
}

// verify completes a TLS handshake with the node and checks its certificate
// against the cluster's Talos CA, for its address. A failure of trust wraps
// discovery.ErrUnverified.
func (c *Client) verify(ctx context.Context, addr netip.Addr) error {
	d := tls.Dialer{Config: c.tlsFor(addr)}

	conn, err := d.DialContext(ctx, "tcp", c.endpoint(addr))
	if err != nil {
		if trustFailure(err) {
			return fmt.Errorf("verifying %s: %w: %w", addr, discoveryctrl.ErrUnverified, err)
		}

		return fmt.Errorf("connecting to %s: %w", addr, err)
	}

	return conn.Close()
}

// trustFailure tells certificate problems from network ones.
func trustFailure(err error) bool {
	var (
		verr *tls.CertificateVerificationError
		uerr x509.UnknownAuthorityError
		herr x509.HostnameError
		ierr x509.CertificateInvalidError
		aerr tls.AlertError
	)

	if errors.As(err, &verr) || errors.As(err, &uerr) || errors.As(err, &herr) || errors.As(err, &ierr) || errors.As(err, &aerr) {
		return true
	}

	// A peer that refuses our client certificate answers with a TLS alert,
	// which gRPC reports as text.
	return strings.Contains(err.Error(), "remote error: tls:") || strings.Contains(err.Error(), "x509:")
}

// Probe implements discovery.Prober.
func (c *Client) Probe(ctx context.Context, addr netip.Addr) (discovery.PeerSpec, error) {
	ctx, cancel := context.WithTimeout(ctx, c.Timeout)
	defer cancel()

	if err := c.verify(ctx, addr); err != nil {
		return discovery.PeerSpec{}, err
	}

	cl, err := c.connect(addr)
	if err != nil {
		return discovery.PeerSpec{}, err
	}
	defer cl.Close() //nolint:errcheck

	wrap := func(what string, err error) error {
		if trustFailure(err) {
			return fmt.Errorf("%s on %s: %w: %w", what, addr, discoveryctrl.ErrUnverified, err)
		}

		return fmt.Errorf("%s on %s: %w", what, addr, err)
	}

	var spec discovery.PeerSpec

	stat, err := cl.machine.SystemStat(ctx, &emptypb.Empty{})
	if err != nil {
		return spec, wrap("reading SystemStat", err)
	}

	if len(stat.GetMessages()) != 1 {
		return spec, fmt.Errorf("reading SystemStat on %s: %d messages, want 1", addr, len(stat.GetMessages()))
	}

	spec.BootTime = int64(stat.GetMessages()[0].GetBootTime()) //nolint:gosec

	mt, err := cl.machineType(ctx)
	if err != nil {
		return spec, wrap("reading the machine type", err)
	}

	spec.MachineType = mt.String()
	spec.ControlPlane = mt.IsControlPlane()

	if spec.ControlPlane {
		spec.EtcdMembers = etcdMembers(ctx, cl)
		spec.EtcdData, spec.EtcdUnknown = etcdData(ctx, cl)

		var ts timepb.StatusSpec

		err := cl.getSpec(ctx, timeStatusNamespace, timeStatusType, timeStatusID, &ts)

		switch {
		case err == nil:
			spec.TimeSynced = ts.GetSynced() || ts.GetSyncDisabled()
		case !state.IsNotFoundError(err):
			return spec, wrap("reading the time status", err)
		}
	}

	return spec, nil
}

// etcdMembers returns the members etcd on the node lists; zero when etcd does
// not answer (the normal state before the bootstrap).
func etcdMembers(ctx context.Context, cl *node) int {
	resp, err := cl.machine.EtcdMemberList(ctx, &machine.EtcdMemberListRequest{QueryLocal: true})
	if err != nil {
		return 0
	}

	n := 0
	for _, m := range resp.GetMessages() {
		n += len(m.GetMembers())
	}

	return n
}

// etcdData reports whether the etcd data directory exists on the node, and
// whether that could not be told.
func etcdData(ctx context.Context, cl *node) (exists, unknown bool) {
	stream, err := cl.machine.List(ctx, &machine.ListRequest{Root: EtcdDataDir})
	if err != nil {
		return false, true
	}

	info, err := stream.Recv()

	switch {
	case err != nil && notExist(err):
		return false, false
	case err != nil:
		return false, true
	case info.GetError() != "" || info.GetMetadata().GetError() != "":
		msg := info.GetError() + info.GetMetadata().GetError()

		return false, !strings.Contains(msg, "no such file or directory")
	}

	return true, false
}

func notExist(err error) bool {
	return status.Code(err) == codes.NotFound || strings.Contains(err.Error(), "no such file or directory")
}

// MachineType implements node.MachineTypeReader for the Local node.
func (c *Client) MachineType(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, c.Timeout)
	defer cancel()

	cl, err := c.connect(c.Local)
	if err != nil {
		return "", err
	}
	defer cl.Close() //nolint:errcheck

	mt, err := cl.machineType(ctx)
	if err != nil {
		return "", fmt.Errorf("reading the machine type of %s: %w", c.Local, err)
	}

	return mt.String(), nil
}

// Bootstrap implements bootstrap.Talos.
func (c *Client) Bootstrap(ctx context.Context, addr netip.Addr) error {
	ctx, cancel := context.WithTimeout(ctx, c.Timeout)
	defer cancel()

	cl, err := c.connect(addr)
	if err != nil {
		return err
	}
	defer cl.Close() //nolint:errcheck

	_, err = cl.machine.Bootstrap(ctx, &machine.BootstrapRequest{})

	switch {
	case status.Code(err) == codes.AlreadyExists:
		return bootstrapctrl.ErrAlreadyBootstrapped
	case err != nil:
		return fmt.Errorf("calling Talos Bootstrap on %s: %w", addr, err)
	}

	return nil
}

// EtcdMembers implements bootstrap.Talos.
func (c *Client) EtcdMembers(ctx context.Context, addr netip.Addr) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, c.Timeout)
	defer cancel()

	cl, err := c.connect(addr)
	if err != nil {
		return 0, err
	}
	defer cl.Close() //nolint:errcheck

	resp, err := cl.machine.EtcdMemberList(ctx, &machine.EtcdMemberListRequest{QueryLocal: true})
	if err != nil {
		return 0, fmt.Errorf("listing etcd members on %s: %w", addr, err)
	}

	n := 0
	for _, m := range resp.GetMessages() {
		n += len(m.GetMembers())
	}

	return n, nil
}

// Compile-time checks that Client satisfies the controllers' interfaces.
var (
	_ discoveryctrl.Prober = (*Client)(nil)
	_ bootstrapctrl.Talos  = (*Client)(nil)
)
