package nodeapi

import (
	"context"
	"math"
	"net"
	"strings"
	"time"

	"go.uber.org/zap"
	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/sovra-dev/sovra/daemon/metrics"
	"github.com/sovra-dev/sovra/daemon/ratelimit"
	pb "github.com/sovra-dev/sovra/internal/nodeapi"
)

const (
	// minPeerBurst is the smallest burst per address: one boot's
	// enrollment, nonce and attestation, retried a few times.
	minPeerBurst = 10
	// peerBurstSeconds is the burst per address in seconds of its rate.
	peerBurstSeconds = 5
	// refusalLogEvery is the shortest time between two log lines about
	// one address's refused calls.
	refusalLogEvery = time.Minute
)

// nodeServicePrefix prefixes the full method names of the NodeService: the
// calls a caller makes before it has a node credential.
var nodeServicePrefix = "/" + pb.NodeService_ServiceDesc.ServiceName + "/"

// peerLimit bounds the NodeService calls (enrollment, nonces, attestation)
// each peer address makes: they need no credential, and each costs the
// daemon TPM verification and API writes. Over the limit a call is refused
// with ResourceExhausted, which agents retry with backoff.
type peerLimit struct {
	calls  *ratelimit.Keyed
	logs   *ratelimit.Keyed
	logger *zap.Logger
	now    func() time.Time
}

// newPeerLimit returns a limit of perSecond calls per address, with a burst
// of peerBurstSeconds of it (at least minPeerBurst); nil when perSecond is
// not positive (no limit).
func newPeerLimit(perSecond float64, logger *zap.Logger) *peerLimit {
	if perSecond <= 0 {
		return nil
	}
	burst := max(minPeerBurst, int(math.Ceil(perSecond*peerBurstSeconds)))
	return &peerLimit{
		calls:  ratelimit.New(rate.Limit(perSecond), burst, 0, 0),
		logs:   ratelimit.New(rate.Every(refusalLogEvery), 1, 0, 0),
		logger: logger,
		now:    time.Now,
	}
}

// check refuses a NodeService call from an address over its rate.
func (p *peerLimit) check(ctx context.Context, method string) error {
	if p == nil || !strings.HasPrefix(method, nodeServicePrefix) {
		return nil
	}
	addr := "unknown"
	if pr, ok := peer.FromContext(ctx); ok && pr.Addr != nil {
		addr = pr.Addr.String()
		if host, _, err := net.SplitHostPort(addr); err == nil {
			addr = host
		}
	}
	now := p.now()
	if p.calls.Allow(addr, now) {
		return nil
	}
	metrics.NodeAPIRateLimited.Inc()
	if p.logs.Allow(addr, now) {
		p.logger.Warn("node API calls refused: over the per-address rate (--node-rate-per-ip)", zap.String("peer", addr), zap.String("method", method))
	}
	return status.Errorf(codes.ResourceExhausted, "too many node API calls from %s: retry later", addr)
}

func (p *peerLimit) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := p.check(ctx, info.FullMethod); err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

func (p *peerLimit) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if err := p.check(ss.Context(), info.FullMethod); err != nil {
		return err
	}
	return handler(srv, ss)
}
