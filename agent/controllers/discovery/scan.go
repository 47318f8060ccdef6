// Package discovery holds the controller that finds the verified Talos peers
// of this cluster, round after round, until the bootstrap path is over.
package discovery

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/cosi-project/runtime/pkg/controller"
	"github.com/cosi-project/runtime/pkg/resource"
	"github.com/cosi-project/runtime/pkg/safe"
	"github.com/cosi-project/runtime/pkg/state"
	"go.uber.org/zap"

	"github.com/sovra-dev/sovra/agent/resources/bootstrap"
	"github.com/sovra-dev/sovra/agent/resources/discovery"
	"github.com/sovra-dev/sovra/agent/resources/node"
	"github.com/sovra-dev/sovra/agent/runtime/clock"
)

// defaultProbeConcurrency bounds the verified probes in flight when the
// controller does not say.
const defaultProbeConcurrency = 64

// ErrUnverified is returned by a Prober for a host whose certificate does not
// chain to the cluster's Talos CA, or that refuses this node's client
// certificate: such a host is not a peer and is ignored.
var ErrUnverified = errors.New("host is not verified by the cluster's Talos CA")

// PeerSource lists the addresses that may be Talos peers of this cluster. The
// edge-only implementation scans a CIDR (package cidrscan); the daemon's
// membership list is another one. A source only proposes addresses: every
// one of them is still verified by the Prober.
type PeerSource interface {
	Peers(ctx context.Context) ([]netip.Addr, error)
}

// Prober reads one address through the Talos API over mutual TLS: its
// machine type, boot time (Talos SystemStat) and etcd state. It returns an
// error wrapping ErrUnverified for a host outside the cluster's trust.
type Prober interface {
	Probe(ctx context.Context, addr netip.Addr) (discovery.PeerSpec, error)
}

// ScanController runs discovery rounds on control-plane nodes: each round
// asks the PeerSource for addresses, probes every one of them and this
// node itself with the Prober, and publishes the verified peers and the
// round. It stops when the node is a worker or the bootstrap path is over.
type ScanController struct {
	// Source proposes addresses.
	Source PeerSource
	// Prober verifies and reads each address.
	Prober Prober
	// Self is this node's address; it is always probed, through the same
	// API as the peers, so its boot time comes from the same source.
	Self netip.Addr
	// Clock paces the rounds.
	Clock clock.Clock
	// Interval is the pause between the end of one round and the start of
	// the next.
	Interval time.Duration
	// Concurrency bounds the probes in flight; zero means 64.
	Concurrency int
}

// Name implements controller.Controller.
func (ctrl *ScanController) Name() string { return "discovery.ScanController" }

// Inputs implements controller.Controller.
func (ctrl *ScanController) Inputs() []controller.Input {
	return []controller.Input{
		{Namespace: node.NamespaceName, Type: node.RoleType, Kind: controller.InputWeak},
		{Namespace: bootstrap.NamespaceName, Type: bootstrap.StatusType, Kind: controller.InputWeak},
	}
}

// Outputs implements controller.Controller.
func (ctrl *ScanController) Outputs() []controller.Output {
	return []controller.Output{
		{Type: discovery.PeerType, Kind: controller.OutputExclusive},
		{Type: discovery.RoundType, Kind: controller.OutputExclusive},
	}
}

// Run implements controller.Controller.
func (ctrl *ScanController) Run(ctx context.Context, r controller.Runtime, logger *zap.Logger) error {
	var (
		number     int
		tick       <-chan time.Time // nil until the node is known to be a control plane
		unverified = map[netip.Addr]bool{}
		lastPeers  []string
	)

	for {
		select {
		case <-ctx.Done():
			return nil
		case <-r.EventCh():
		case <-tick:
			number++

			spec := ctrl.round(ctx, logger, number, unverified)
			if err := ctrl.publish(ctx, r, spec); err != nil {
				return err
			}

			peers := make([]string, 0, len(spec.Peers))
			for _, p := range spec.Peers {
				peers = append(peers, p.Address)
			}

			if !slices.Equal(peers, lastPeers) {
				logger.Info("discovery round: verified peers changed",
					zap.Int("round", number), zap.Strings("peers", peers), zap.Int("unverified", spec.Unverified),
					zap.Int("failed", spec.Failed), zap.Int64("duration_ms", spec.DurationMillis))
			}

			lastPeers = peers
			tick = ctrl.Clock.After(ctrl.Interval)

			continue
		}

		done, err := ctrl.finished(ctx, r, logger)
		if err != nil {
			return err
		}

		if done {
			return nil
		}

		if tick == nil && ctrl.isControlPlane(ctx, r) {
			logger.Info("starting peer discovery", zap.Stringer("self", ctrl.Self), zap.Duration("interval", ctrl.Interval))

			tick = ctrl.Clock.After(0)
		}
	}
}

func (ctrl *ScanController) isControlPlane(ctx context.Context, r controller.Runtime) bool {
	role, err := safe.ReaderGetByID[*node.Role](ctx, r, node.RoleID)

	return err == nil && role.TypedSpec().ControlPlane
}

// finished reports whether discovery is over: the node is a worker, or the
// bootstrap path reached a final phase.
func (ctrl *ScanController) finished(ctx context.Context, r controller.Runtime, logger *zap.Logger) (bool, error) {
	role, err := safe.ReaderGetByID[*node.Role](ctx, r, node.RoleID)
	if err != nil && !state.IsNotFoundError(err) {
		return false, fmt.Errorf("reading the node role: %w", err)
	}

	if err == nil && !role.TypedSpec().ControlPlane {
		logger.Info("not a control-plane node: no peer discovery")

		return true, nil
	}

	status, err := safe.ReaderGetByID[*bootstrap.Status](ctx, r, bootstrap.StatusID)
	if err != nil && !state.IsNotFoundError(err) {
		return false, fmt.Errorf("reading the bootstrap status: %w", err)
	}

	if err == nil && status.TypedSpec().Phase.Final() {
		logger.Info("bootstrap path over: peer discovery stopped", zap.String("phase", string(status.TypedSpec().Phase)))

		return true, nil
	}

	return false, nil
}

// round runs one discovery round. It never fails: a source error gives a
// round with this node alone (which can never reach a quorum above one).
func (ctrl *ScanController) round(ctx context.Context, logger *zap.Logger, number int, unverified map[netip.Addr]bool) discovery.RoundSpec {
	start := ctrl.Clock.Now()

	addrs, err := ctrl.Source.Peers(ctx)
	if err != nil {
		logger.Warn("listing peer addresses failed", zap.Int("round", number), zap.Error(err))
	}

	spec, rejected := ProbeAll(ctx, ctrl.Prober, ctrl.Self, addrs, ctrl.concurrency())
	spec.Number = number
	spec.DurationMillis = ctrl.Clock.Now().Sub(start).Milliseconds()

	for addr, err := range rejected {
		if errors.Is(err, ErrUnverified) {
			if !unverified[addr] {
				logger.Warn("ignoring host without a valid certificate from the cluster's Talos CA",
					zap.Stringer("address", addr), zap.Error(err))
			}

			unverified[addr] = true

			continue
		}

		logger.Debug("probing peer failed", zap.Stringer("address", addr), zap.Error(err))
	}

	return spec
}

func (ctrl *ScanController) concurrency() int {
	if ctrl.Concurrency > 0 {
		return ctrl.Concurrency
	}

	return defaultProbeConcurrency
}

// ProbeAll probes self and every address (self is added when missing) with
// at most concurrency probes in flight, and returns the round without its
// number and duration, plus the error of every address that failed. It is
// shared by the controller, the `discover` command and the simulation.
func ProbeAll(ctx context.Context, prober Prober, self netip.Addr, addrs []netip.Addr, concurrency int) (discovery.RoundSpec, map[netip.Addr]error) {
	spec := discovery.RoundSpec{Candidates: len(addrs)}
	if self.IsValid() {
		spec.Self = self.String()

		if !slices.Contains(addrs, self) {
			addrs = append(slices.Clone(addrs), self)
		}
	}

	var (
		mu       sync.Mutex // guards spec and rejected
		rejected = map[netip.Addr]error{}
		wg       sync.WaitGroup
		sem      = make(chan struct{}, max(concurrency, 1))
	)

	for _, addr := range addrs {
		wg.Add(1)

		sem <- struct{}{}

		go func() {
			defer func() { <-sem; wg.Done() }()

			peer, err := prober.Probe(ctx, addr)

			mu.Lock()
			defer mu.Unlock()

			switch {
			case err != nil:
				rejected[addr] = err

				if errors.Is(err, ErrUnverified) {
					spec.Unverified++
				} else {
					spec.Failed++
				}
			default:
				peer.Address = addr.String()
				peer.Self = addr == self
				spec.Peers = append(spec.Peers, peer)
			}
		}()
	}

	wg.Wait()

	slices.SortFunc(spec.Peers, func(a, b discovery.PeerSpec) int {
		return netip.MustParseAddr(a.Address).Compare(netip.MustParseAddr(b.Address))
	})

	return spec, rejected
}

// publish writes the round and one Peer per verified peer, and removes the
// Peers that were not seen in this round.
func (ctrl *ScanController) publish(ctx context.Context, r controller.Runtime, spec discovery.RoundSpec) error {
	r.StartTrackingOutputs()

	for _, p := range spec.Peers {
		if err := safe.WriterModify(ctx, r, discovery.NewPeer(resource.ID(p.Address)), func(res *discovery.Peer) error {
			*res.TypedSpec() = p

			return nil
		}); err != nil {
			return fmt.Errorf("writing peer %s: %w", p.Address, err)
		}
	}

	if err := safe.WriterModify(ctx, r, discovery.NewRound(), func(res *discovery.Round) error {
		*res.TypedSpec() = spec

		return nil
	}); err != nil {
		return fmt.Errorf("writing discovery round %d: %w", spec.Number, err)
	}

	if err := r.CleanupOutputs(ctx, resource.NewMetadata(discovery.NamespaceName, discovery.PeerType, "", resource.VersionUndefined)); err != nil {
		return fmt.Errorf("cleaning up old peers: %w", err)
	}

	return nil
}
