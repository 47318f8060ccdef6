// Package daemonlink is the agent's authenticated link to the daemon's
// ClusterService: the membership list of the node's cluster as a discovery
// PeerSource, and the cluster's bootstrap lease as the bootstrap controller's
// BootstrapLease. It runs on the agent's daemon connection
// (agent/daemonconn), which presents the node credential (mutual TLS) and
// bounds every call; the daemon knows the node, and its cluster, from the
// credential.
package daemonlink

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/sovra-dev/sovra/agent/controllers/bootstrap"
	"github.com/sovra-dev/sovra/agent/controllers/discovery"
	"github.com/sovra-dev/sovra/agent/runtime/clock"
	"github.com/sovra-dev/sovra/internal/nodeapi"
)

// Pacing of the report of a done bootstrap, which the daemon should hear
// even through a hiccup.
const (
	completeAttempts = 5
	completeRetry    = 2 * time.Second
)

// Link talks to the ClusterService. It is safe for concurrent use.
type Link struct {
	// Conn is the connection to the daemon's node API: a
	// *daemonconn.Conn, which presents the node credential and bounds
	// each call.
	Conn grpc.ClientConnInterface
	// Self is the address this node takes part in the election with; it is
	// announced to the daemon with every membership call.
	Self netip.Addr
	// Logger receives the decisions; nil discards.
	Logger *zap.Logger
	// Clock paces the retries of Complete; nil is the wall clock.
	Clock clock.Clock
}

var (
	_ discovery.PeerSource     = (*Link)(nil)
	_ bootstrap.BootstrapLease = (*Link)(nil)
)

// call runs fn with a ClusterService client on the connection.
func (l *Link) call(ctx context.Context, fn func(context.Context, nodeapi.ClusterServiceClient) error) error {
	return fn(ctx, nodeapi.NewClusterServiceClient(l.Conn))
}

func (l *Link) clock() clock.Clock {
	if l.Clock == nil {
		return clock.Real{}
	}
	return l.Clock
}

func (l *Link) logger() *zap.Logger {
	if l.Logger == nil {
		return zap.NewNop()
	}
	return l.Logger
}

// Peers implements discovery.PeerSource: the announced addresses of the
// other attested members of this node's cluster. A member that has not
// announced its address yet is left out until it does (on its own first
// membership call); each member gives at most one address, so no node is
// ever counted twice. The address the cluster's bootstrap lease is
// committed to is probed too, member or not (the Talos control-plane
// provider's target is a machine without an agent's record, or one whose
// agent ended before it announced): etcd there ends the election.
func (l *Link) Peers(ctx context.Context) ([]netip.Addr, error) {
	var resp *nodeapi.ListMembersResponse
	err := l.call(ctx, func(ctx context.Context, c nodeapi.ClusterServiceClient) error {
		var err error
		resp, err = c.ListMembers(ctx, &nodeapi.ListMembersRequest{Address: l.Self.String()})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listing the cluster's members from the daemon: %w", err)
	}
	var out []netip.Addr
	for _, m := range resp.GetMembers() {
		if m.GetSelf() {
			continue
		}
		a, err := netip.ParseAddr(m.GetAddress())
		if err != nil {
			l.logger().Debug("member has not announced its address yet", zap.String("member", m.GetNode()))
			continue
		}
		if a == l.Self || slices.Contains(out, a) {
			continue
		}
		out = append(out, a)
	}
	if a, err := netip.ParseAddr(resp.GetBootstrapAddress()); err == nil && a != l.Self && !slices.Contains(out, a) {
		out = append(out, a)
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out, nil
}

// lease asks for phase and returns the daemon's answer.
func (l *Link) lease(ctx context.Context, holder string, phase nodeapi.BootstrapPhase) (*nodeapi.BootstrapLeaseResponse, error) {
	var resp *nodeapi.BootstrapLeaseResponse
	err := l.call(ctx, func(ctx context.Context, c nodeapi.ClusterServiceClient) error {
		var err error
		resp, err = c.BootstrapLease(ctx, &nodeapi.BootstrapLeaseRequest{Phase: phase, Address: holder})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("asking the daemon for the bootstrap lease (%s): %w", phase, err)
	}
	fields := []zap.Field{
		zap.String("asked", phase.String()), zap.String("cluster", resp.GetCluster()),
		zap.String("holder", resp.GetHolder()), zap.String("holder_address", resp.GetHolderAddress()),
		zap.String("phase", resp.GetPhase().String()), zap.String("message", resp.GetMessage()),
	}
	if resp.GetGranted() {
		l.logger().Info("bootstrap lease granted", fields...)
	} else {
		l.logger().Info("bootstrap lease denied", fields...)
	}
	return resp, nil
}

// Acquire implements bootstrap.BootstrapLease.
func (l *Link) Acquire(ctx context.Context, holder string) (bool, error) {
	resp, err := l.lease(ctx, holder, nodeapi.BootstrapPhase_BOOTSTRAP_PHASE_HELD)
	if err != nil {
		return false, err
	}
	return resp.GetGranted(), nil
}

// Commit implements bootstrap.BootstrapLease.
func (l *Link) Commit(ctx context.Context, holder string) (bool, error) {
	resp, err := l.lease(ctx, holder, nodeapi.BootstrapPhase_BOOTSTRAP_PHASE_BOOTSTRAPPING)
	if err != nil {
		return false, err
	}
	return resp.GetGranted(), nil
}

// Complete implements bootstrap.BootstrapLease, retrying a few times.
func (l *Link) Complete(ctx context.Context, holder string) error {
	var err error
	for attempt := range completeAttempts {
		if attempt > 0 {
			select {
			case <-ctx.Done():
				return errors.Join(err, ctx.Err())
			case <-l.clock().After(completeRetry):
			}
		}
		var resp *nodeapi.BootstrapLeaseResponse
		if resp, err = l.lease(ctx, holder, nodeapi.BootstrapPhase_BOOTSTRAP_PHASE_BOOTSTRAPPED); err == nil {
			if !resp.GetGranted() {
				return fmt.Errorf("the daemon refused the report: %s", resp.GetMessage())
			}
			return nil
		}
	}
	return err
}
