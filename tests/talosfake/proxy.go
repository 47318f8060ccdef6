package talosfake

import (
	"context"
	"crypto/tls"
	stdx509 "crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/siderolabs/crypto/x509"
	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/config/generate/secrets"
	"github.com/siderolabs/talos/pkg/machinery/constants"
	"github.com/siderolabs/talos/pkg/machinery/role"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
)

// gRPC metadata keys of apid's node routing (internal/app/apid/pkg/director
// and pkg/backend in siderolabs/talos).
const (
	// nodesKey asks for one-to-many proxying: one reply message per node.
	nodesKey = "nodes"
	// nodeKey asks for one-to-one proxying: the node's reply, unchanged.
	nodeKey = "node"
	// proxyFromKey marks a call forwarded by another node: answer locally.
	proxyFromKey = "proxyfrom"
	// authorityKey is the incoming pseudo-header apid copies to proxyFromKey.
	authorityKey = ":authority"
	// originKey is the fake's own addition: the address of the client that
	// called the forwarding node, so the Bootstrap log names who asked.
	originKey = "talosfake-origin"
)

// Peer connections. apid caps the reconnect backoff at 15s; the fake uses
// less so a peer that starts late is reachable soon in a test.
const (
	peerMaxBackoff     = time.Second
	peerConnectTimeout = 20 * time.Second
)

// oneToManyServices are the services apid fans out to several nodes;
// "nodes" on any other service is refused.
var oneToManyServices = []string{
	"/machine.MachineService/",
	"/cluster.ClusterService/",
	"/inspect.InspectService/",
	"/storage.StorageService/",
	"/time.TimeService/",
}

// route is where a call goes, decided like apid's director.
type route struct {
	// targets are the nodes named by the caller; nil means answer locally.
	targets []string
	// many is one-to-many proxying: a reply message per target, with
	// per-node failures reported in the message metadata.
	many bool
}

// routeOf reads the routing metadata of an incoming call like apid's
// director: a forwarded call (proxyfrom) or one without node metadata is
// answered locally, "nodes" wins over "node", and "node" must be single.
func routeOf(ctx context.Context, method string) (route, error) {
	md, ok := metadata.FromIncomingContext(ctx)
	if !ok || len(md.Get(proxyFromKey)) > 0 {
		return route{}, nil
	}

	nodes, okNodes := md[nodesKey]
	node, okNode := md[nodeKey]

	if okNode && len(node) != 1 {
		return route{}, status.Error(codes.InvalidArgument, "node metadata must be single-valued")
	}

	switch {
	case okNodes:
		if !slices.ContainsFunc(oneToManyServices, func(prefix string) bool { return strings.HasPrefix(method, prefix) }) {
			return route{}, status.Errorf(codes.InvalidArgument, "one-2-many proxying is not supported for method %s", method)
		}

		if len(nodes) == 0 {
			return route{}, status.Error(codes.Unavailable, "no backend connections for proxying")
		}

		return route{targets: nodes, many: true}, nil
	case okNode:
		return route{targets: node}, nil
	default:
		return route{}, nil
	}
}

// routeUnary is the unary half of the router: it answers locally, forwards
// to one node, or fans out and merges one reply message per node.
func (n *Node) routeUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	r, err := routeOf(ctx, info.FullMethod)
	if err != nil {
		return nil, err
	}

	if r.targets == nil {
		return handler(ctx, req)
	}

	if !r.many {
		return n.callOne(ctx, r.targets[0], info.FullMethod, req, handler)
	}

	_, replyType, err := methodTypes(info.FullMethod)
	if err != nil {
		return nil, err
	}

	// Replies are merged in the order of the targets; apid merges them in
	// the order they arrive, so callers cannot rely on either.
	replies := make([][]byte, len(r.targets))
	errs := make([]error, len(r.targets))

	var wg sync.WaitGroup

	for i, target := range r.targets {
		wg.Go(func() {
			reply, err := n.callOne(ctx, target, info.FullMethod, req, handler)
			if err != nil {
				replies[i], errs[i] = errorReply(false, target, err)

				return
			}

			b, err := proto.Marshal(reply.(proto.Message)) //nolint:forcetypeassert // gRPC replies are messages
			if err != nil {
				errs[i] = err

				return
			}

			replies[i], errs[i] = appendHostname(false, b, target)
		})
	}

	wg.Wait()

	if err := errors.Join(errs...); err != nil {
		return nil, status.Errorf(codes.Internal, "merging node replies: %v", err)
	}

	merged := replyType.New().Interface()
	if err := proto.Unmarshal(slices.Concat(replies...), merged); err != nil {
		return nil, status.Errorf(codes.Internal, "merging node replies: %v", err)
	}

	return merged, nil
}

// callOne answers a unary call for one target: locally when the target is
// this node, else forwarded to the target's fake.
func (n *Node) callOne(ctx context.Context, target, method string, req any, handler grpc.UnaryHandler) (any, error) {
	if n.isLocal(target) {
		return handler(localContext(ctx), req)
	}

	_, replyType, err := methodTypes(method)
	if err != nil {
		return nil, err
	}

	conn, err := n.peer(target)
	if err != nil {
		return nil, err
	}

	reply := replyType.New().Interface()
	if err := conn.Invoke(forwardContext(ctx), method, req, reply); err != nil {
		return nil, err
	}

	return reply, nil
}

// routeStream is the streaming half of the router, for server-streaming
// calls (List): forwarded to one node the messages pass unchanged; fanned
// out, every message names its node, a node's failure becomes one message
// carrying the error, and the stream itself ends without error.
func (n *Node) routeStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	ctx := ss.Context()

	r, err := routeOf(ctx, info.FullMethod)
	if err != nil {
		return err
	}

	if r.targets == nil {
		return handler(srv, ss)
	}

	if info.IsClientStream {
		return status.Errorf(codes.Unimplemented, "talosfake does not proxy client streams (%s)", info.FullMethod)
	}

	reqType, replyType, err := methodTypes(info.FullMethod)
	if err != nil {
		return err
	}

	req := reqType.New().Interface()
	if err := ss.RecvMsg(req); err != nil {
		return err
	}

	if !r.many {
		return n.streamOne(ctx, r.targets[0], info.FullMethod, req, srv, ss, handler, func(m proto.Message) error { return ss.SendMsg(m) })
	}

	// sendMu serializes sends on ss, which is not safe for concurrent use.
	var sendMu sync.Mutex

	sendReply := func(target string, reply []byte) error {
		m := replyType.New().Interface()
		if err := proto.Unmarshal(reply, m); err != nil {
			return err
		}

		sendMu.Lock()
		defer sendMu.Unlock()

		if err := ss.SendMsg(m); err != nil {
			return fmt.Errorf("sending the reply of %s: %w", target, err)
		}

		return nil
	}

	errs := make([]error, len(r.targets))

	var wg sync.WaitGroup

	for i, target := range r.targets {
		wg.Go(func() {
			// relayErr is a failure to pass a reply on, which ends the
			// call; a failure of the node is a reply.
			var relayErr error

			err := n.streamOne(ctx, target, info.FullMethod, req, srv, ss, handler, func(m proto.Message) error {
				b, err := proto.Marshal(m)
				if err == nil {
					b, err = appendHostname(true, b, target)
				}

				if err == nil {
					err = sendReply(target, b)
				}

				relayErr = err

				return err
			})

			switch {
			case relayErr != nil:
				errs[i] = relayErr
			case err != nil:
				reply, err := errorReply(true, target, err)
				if err == nil {
					err = sendReply(target, reply)
				}

				errs[i] = err
			}
		})
	}

	wg.Wait()

	if err := errors.Join(errs...); err != nil {
		return status.Errorf(codes.Internal, "proxying to nodes: %v", err)
	}

	return nil
}

// streamOne answers a server-streaming call for one target, passing every
// reply message to send.
func (n *Node) streamOne(
	ctx context.Context, target, method string, req proto.Message,
	srv any, ss grpc.ServerStream, handler grpc.StreamHandler, send func(proto.Message) error,
) error {
	if n.isLocal(target) {
		return handler(srv, &localStream{ServerStream: ss, ctx: localContext(ctx), req: req, send: send})
	}

	_, replyType, err := methodTypes(method)
	if err != nil {
		return err
	}

	conn, err := n.peer(target)
	if err != nil {
		return err
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	cs, err := conn.NewStream(forwardContext(ctx), &grpc.StreamDesc{ServerStreams: true}, method)
	if err != nil {
		return err
	}

	if err := cs.SendMsg(req); err != nil {
		return err
	}

	if err := cs.CloseSend(); err != nil {
		return err
	}

	for {
		reply := replyType.New().Interface()
		if err := cs.RecvMsg(reply); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}

			return err
		}

		if err := send(reply); err != nil {
			return err
		}
	}
}

// localStream runs a server-streaming handler for one target of a routed
// call: the request was already received, and replies go to send.
type localStream struct {
	grpc.ServerStream

	ctx  context.Context //nolint:containedctx // a grpc.ServerStream carries its context
	req  proto.Message
	send func(proto.Message) error
	// received is set once the handler has read the request.
	received bool
}

func (s *localStream) Context() context.Context { return s.ctx }

func (s *localStream) RecvMsg(m any) error {
	if s.received {
		return io.EOF
	}

	s.received = true

	proto.Merge(m.(proto.Message), s.req) //nolint:forcetypeassert // gRPC requests are messages

	return nil
}

func (s *localStream) SendMsg(m any) error {
	return s.send(m.(proto.Message)) //nolint:forcetypeassert // gRPC replies are messages
}

// appendHostname is apid's AppendInfo (pkg/backend/apid.go in
// siderolabs/talos): it appends a common.Metadata naming target to a
// node's reply. A streamed reply is one message, so the metadata field is
// appended to it; a unary reply is {repeated messages = 1} with one
// message, so the metadata is appended inside that message. Protobuf merges
// repeated embedded fields, so the hostname overrides the node's own.
func appendHostname(streaming bool, reply []byte, target string) ([]byte, error) {
	const messagesField = protowire.Number(1)

	info, err := proto.Marshal(&common.Empty{Metadata: &common.Metadata{Hostname: target}})
	if err != nil {
		return nil, err
	}

	if streaming {
		return append(reply, info...), nil
	}

	num, typ, n1 := protowire.ConsumeTag(reply)
	if n1 < 0 {
		return nil, protowire.ParseError(n1)
	}

	if num != messagesField || typ != protowire.BytesType {
		return nil, fmt.Errorf("unexpected reply format: field %d of type %d", num, typ)
	}

	_, n2 := protowire.ConsumeVarint(reply[n1:])
	if n2 < 0 {
		return nil, protowire.ParseError(n2)
	}

	message := reply[n1+n2:]
	out := protowire.AppendTag(nil, messagesField, protowire.BytesType)
	out = protowire.AppendVarint(out, uint64(len(message)+len(info)))

	return slices.Concat(out, message, info), nil
}

// errorReply is apid's BuildError: a node's failure as a reply message
// whose only field is the metadata, with Hostname, Error (the error text)
// and Status (the gRPC status) set. Unmarshalled as any reply type, only
// Metadata is set.
func errorReply(streaming bool, target string, err error) ([]byte, error) {
	msg := &common.Empty{Metadata: &common.Metadata{
		Hostname: target,
		Error:    err.Error(),
		Status:   status.Convert(err).Proto(),
	}}

	if streaming {
		return proto.Marshal(msg)
	}

	return proto.Marshal(&common.EmptyResponse{Messages: []*common.Empty{msg}})
}

// methodTypes returns the request and reply types of a gRPC method from
// the protobuf registry.
func methodTypes(fullMethod string) (req, reply protoreflect.MessageType, err error) {
	service, method, ok := strings.Cut(strings.TrimPrefix(fullMethod, "/"), "/")
	if !ok {
		return nil, nil, status.Errorf(codes.Unimplemented, "malformed method name %q", fullMethod)
	}

	d, err := protoregistry.GlobalFiles.FindDescriptorByName(protoreflect.FullName(service))
	if err != nil {
		return nil, nil, status.Errorf(codes.Unimplemented, "unknown service %s: %v", service, err)
	}

	sd, ok := d.(protoreflect.ServiceDescriptor)
	if !ok {
		return nil, nil, status.Errorf(codes.Unimplemented, "%s is not a service", service)
	}

	md := sd.Methods().ByName(protoreflect.Name(method))
	if md == nil {
		return nil, nil, status.Errorf(codes.Unimplemented, "unknown method %s", fullMethod)
	}

	if req, err = protoregistry.GlobalTypes.FindMessageByName(md.Input().FullName()); err != nil {
		return nil, nil, status.Errorf(codes.Internal, "request type of %s: %v", fullMethod, err)
	}

	if reply, err = protoregistry.GlobalTypes.FindMessageByName(md.Output().FullName()); err != nil {
		return nil, nil, status.Errorf(codes.Internal, "reply type of %s: %v", fullMethod, err)
	}

	return req, reply, nil
}

// localContext is ctx without the routing metadata, for answering one
// target of a routed call locally.
func localContext(ctx context.Context) context.Context {
	md, _ := metadata.FromIncomingContext(ctx)
	md = md.Copy()

	delete(md, nodesKey)
	delete(md, nodeKey)

	return metadata.NewIncomingContext(ctx, md)
}

// forwardContext builds the outgoing metadata of a forwarded call like
// apid: the incoming metadata without the routing keys, the caller's roles
// (the peer trusts them because the fake's client certificate carries
// os:impersonator), and proxyfrom, which makes the peer answer locally.
func forwardContext(ctx context.Context) context.Context {
	md, _ := metadata.FromIncomingContext(ctx)
	md = md.Copy()

	md.Set(constants.APIAuthzRoleMetadataKey, rolesOf(ctx).Strings()...)

	if authority := md[authorityKey]; len(authority) > 0 {
		md.Set(proxyFromKey, authority...)
	} else {
		md.Set(proxyFromKey, "unknown")
	}

	if p, ok := peer.FromContext(ctx); ok {
		md.Set(originKey, p.Addr.String())
	}

	delete(md, authorityKey)
	delete(md, nodesKey)
	delete(md, nodeKey)

	return metadata.NewOutgoingContext(ctx, md)
}

// rolesOf returns the caller's roles like Talos' authz injector: the
// organizations of the client certificate, or, for an os:impersonator
// certificate (apid forwarding a call), the roles in the call's metadata.
func rolesOf(ctx context.Context) role.Set {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return role.Zero
	}

	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.VerifiedChains) == 0 || len(info.State.VerifiedChains[0]) == 0 {
		return role.Zero
	}

	roles, _ := role.Parse(info.State.VerifiedChains[0][0].Subject.Organization)
	if !roles.Includes(role.Impersonator) {
		return roles
	}

	md, _ := metadata.FromIncomingContext(ctx)
	if asked := md.Get(constants.APIAuthzRoleMetadataKey); len(asked) > 0 {
		roles, _ = role.Parse(asked)
	}

	return roles
}

// hasRole reports whether the caller has r.
func hasRole(ctx context.Context, r role.Role) bool { return rolesOf(ctx).Includes(r) }

// isLocal reports whether a routing target names this node.
func (n *Node) isLocal(target string) bool {
	addr, err := netip.ParseAddr(strings.Trim(target, "[]"))

	return err == nil && addr == n.opts.Address
}

// peer returns the connection to target's fake, dialing it on first use.
func (n *Node) peer(target string) (*grpc.ClientConn, error) {
	n.peersMu.Lock()
	defer n.peersMu.Unlock()

	if conn, ok := n.peers[target]; ok {
		return conn, nil
	}

	host := strings.Trim(target, "[]")
	if host == "" || strings.ContainsAny(host, " /") {
		return nil, status.Errorf(codes.Internal, "invalid target %q", target)
	}

	peerTLS := n.peerTLS.Load()
	if peerTLS == nil {
		// A worker's apid has no client certificate of its own to forward
		// with (machined issues it only from a CA key).
		return nil, status.Errorf(codes.Unavailable, "no client certificate to proxy to %s", target)
	}

	dialer := &net.Dialer{LocalAddr: n.sourceFor(host)}

	backoffConfig := backoff.DefaultConfig
	backoffConfig.MaxDelay = peerMaxBackoff

	conn, err := grpc.NewClient(net.JoinHostPort(host, strconv.Itoa(n.opts.APIPort)),
		grpc.WithTransportCredentials(credentials.NewTLS(peerTLS)),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return dialer.DialContext(ctx, "tcp", addr)
		}),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoffConfig, MinConnectTimeout: peerConnectTimeout}),
	)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "connecting to %s: %v", target, err)
	}

	if n.peers == nil {
		n.peers = map[string]*grpc.ClientConn{}
	}

	n.peers[target] = conn

	return conn, nil
}

// sourceFor binds forwarded calls to this node's address, so that the peer
// sees (and its Bootstrap log records) the forwarding node, when the target
// is reachable from it: same family, and both loopback or neither. nil
// lets the kernel choose.
func (n *Node) sourceFor(host string) net.Addr {
	addr, err := netip.ParseAddr(host)
	own := n.opts.Address

	if err != nil || !own.IsValid() || own.IsUnspecified() || addr.Is4() != own.Is4() || addr.IsLoopback() != own.IsLoopback() {
		return nil
	}

	return &net.TCPAddr{IP: own.AsSlice()}
}

// closePeers closes the connections to the other nodes.
func (n *Node) closePeers() {
	n.peersMu.Lock()
	defer n.peersMu.Unlock()

	for target, conn := range n.peers {
		conn.Close() //nolint:errcheck
		delete(n.peers, target)
	}
}

// peerTLSConfig is the client side of forwarding: a client certificate
// from the cluster CA with os:impersonator, as machined issues apid's, and
// the CA as the only root for the peer's server certificate.
func peerTLSConfig(ca *x509.PEMEncodedCertificateAndKey) (*tls.Config, error) {
	kp, err := secrets.NewAdminCertificateAndKey(time.Now().Add(-certBackdate), ca, role.MakeSet(role.Impersonator), serverCertTTL)
	if err != nil {
		return nil, fmt.Errorf("issuing the forwarding client certificate: %w", err)
	}

	cert, err := tls.X509KeyPair(kp.Crt, kp.Key)
	if err != nil {
		return nil, fmt.Errorf("loading the forwarding client certificate: %w", err)
	}

	pool := stdx509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca.Crt) {
		return nil, errors.New("loading the Talos CA: not a PEM certificate")
	}

	return &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, MinVersion: tls.VersionTLS12}, nil
}
