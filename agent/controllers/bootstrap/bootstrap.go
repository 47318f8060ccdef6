// Package bootstrap holds the controller that acts on the election: the
// leader bootstraps etcd on itself through the Talos API, followers watch etcd
// come up on the leader, and then the bootstrap path is over.
package bootstrap

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/cosi-project/runtime/pkg/controller"
	"github.com/cosi-project/runtime/pkg/safe"
	"github.com/cosi-project/runtime/pkg/state"
	"go.uber.org/zap"

	"github.com/sovra-dev/sovra/agent/resources/bootstrap"
	"github.com/sovra-dev/sovra/agent/resources/election"
	"github.com/sovra-dev/sovra/agent/resources/node"
	"github.com/sovra-dev/sovra/agent/runtime/clock"
)

// ErrAlreadyBootstrapped is returned by Talos.Bootstrap when the node's etcd
// is already bootstrapped (Talos answers AlreadyExists). It counts as success.
var ErrAlreadyBootstrapped = errors.New("etcd is already bootstrapped on the node")

// Talos is what the controller needs from the Talos API.
type Talos interface {
	// Bootstrap asks the node at addr to bootstrap etcd.
	Bootstrap(ctx context.Context, addr netip.Addr) error
	// EtcdMembers returns the number of etcd members the node at addr
	// reports; an error while etcd is not running there.
	EtcdMembers(ctx context.Context, addr netip.Addr) (int, error)
}

// BootstrapLease is the cluster-wide bootstrap lease held in the daemon's API
// (a compare-and-swap), which also fences the Talos control-plane provider.
// holder is this node's address; the daemon knows the node by its credential.
type BootstrapLease interface {
	// Acquire returns true when this node holds the lease, now or already.
	// A lease that is held but not committed expires unless renewed, and
	// another node may then win it.
	Acquire(ctx context.Context, holder string) (bool, error)
	// Commit makes this node's lease permanent right before it calls Talos
	// Bootstrap, and returns false when the node no longer holds it (it
	// expired and another node won it): then it must not bootstrap.
	Commit(ctx context.Context, holder string) (bool, error)
	// Complete reports that this node bootstrapped etcd: the lease is final.
	Complete(ctx context.Context, holder string) error
}

// BootstrapController bootstraps etcd on the elected leader and follows it
// elsewhere.
type BootstrapController struct {
	// Talos reaches the Talos API of this node and of the leader.
	Talos Talos
	// Lease, when set, must be won before the leader bootstraps. Nil is
	// edge-only mode: no daemon, no lease.
	Lease BootstrapLease
	// Clock paces the follower's polls.
	Clock clock.Clock
	// PollInterval is how often a follower checks etcd on the leader.
	PollInterval time.Duration
}

// Name implements controller.Controller.
func (ctrl *BootstrapController) Name() string { return "bootstrap.BootstrapController" }

// Inputs implements controller.Controller.
func (ctrl *BootstrapController) Inputs() []controller.Input {
	return []controller.Input{
		{Namespace: node.NamespaceName, Type: node.RoleType, Kind: controller.InputWeak},
		{Namespace: election.NamespaceName, Type: election.ElectionType, Kind: controller.InputWeak},
	}
}

// Outputs implements controller.Controller.
func (ctrl *BootstrapController) Outputs() []controller.Output {
	return []controller.Output{{Type: bootstrap.StatusType, Kind: controller.OutputExclusive}}
}

// Run implements controller.Controller. It returns once the phase is final.
func (ctrl *BootstrapController) Run(ctx context.Context, r controller.Runtime, logger *zap.Logger) error {
	var (
		poll     <-chan time.Time // set while following
		leader   string           // the leader followed
		phase    bootstrap.Phase
		lastWait string
	)

	for {
		select {
		case <-ctx.Done():
			return nil
		case <-r.EventCh():
		case <-poll:
			poll = nil

			if ctrl.leaderHasEtcd(ctx, logger, leader) {
				logger.Info("etcd is up on the leader: this node joins; bootstrap path done", zap.String("leader", leader))

				return ctrl.write(ctx, r, bootstrap.PhaseJoined, leader, "etcd is up on the leader "+leader)
			}

			poll = ctrl.Clock.After(ctrl.PollInterval)
		}

		role, err := safe.ReaderGetByID[*node.Role](ctx, r, node.RoleID)
		if err != nil && !state.IsNotFoundError(err) {
			return fmt.Errorf("reading the node role: %w", err)
		}

		if err == nil && !role.TypedSpec().ControlPlane {
			logger.Info("worker node: leaving the bootstrap path", zap.String("machine_type", role.TypedSpec().MachineType))

			return ctrl.write(ctx, r, bootstrap.PhaseNotParticipating, "", "worker nodes do not bootstrap etcd")
		}

		el, err := safe.ReaderGetByID[*election.Election](ctx, r, election.ElectionID)
		if err != nil {
			if !state.IsNotFoundError(err) {
				return fmt.Errorf("reading the election: %w", err)
			}

			if phase == "" {
				phase = bootstrap.PhaseWaiting

				if err := ctrl.write(ctx, r, phase, "", "waiting for the first election"); err != nil {
					return err
				}
			}

			continue
		}

		spec := el.TypedSpec()

		switch spec.Decision {
		case election.DecisionEtcdExists:
			logger.Info("etcd already exists in the cluster: not bootstrapping", zap.String("etcd_peer", spec.EtcdPeer))

			return ctrl.write(ctx, r, bootstrap.PhaseAlreadyBootstrapped, spec.EtcdPeer, spec.Reason)

		case election.DecisionLeader:
			done, err := ctrl.lead(ctx, r, logger, spec)
			if err != nil || done {
				return err
			}

		case election.DecisionFollower:
			if phase != bootstrap.PhaseFollowing || leader != spec.Leader {
				leader, phase = spec.Leader, bootstrap.PhaseFollowing

				logger.Info("following the leader: waiting for etcd on it", zap.String("leader", leader))

				if err := ctrl.write(ctx, r, phase, leader, "waiting for etcd on the leader "+leader); err != nil {
					return err
				}

				poll = ctrl.Clock.After(0)
			}

		case election.DecisionWaiting:
			if phase == bootstrap.PhaseFollowing {
				// Keep following: the election lost its quorum, but the
				// leader it named may have bootstrapped already.
				continue
			}

			if spec.Reason != lastWait {
				lastWait, phase = spec.Reason, bootstrap.PhaseWaiting

				if err := ctrl.write(ctx, r, phase, "", spec.Reason); err != nil {
					return err
				}
			}
		}
	}
}

// lead bootstraps etcd on this node. It reports done when the bootstrap
// succeeded; a failure is logged and retried on the next election round.
func (ctrl *BootstrapController) lead(ctx context.Context, r controller.Runtime, logger *zap.Logger, spec *election.ElectionSpec) (bool, error) {
	self, err := netip.ParseAddr(spec.Self)
	if err != nil {
		return false, fmt.Errorf("parsing this node's address %q: %w", spec.Self, err)
	}

	if ctrl.Lease != nil {
		won, err := ctrl.Lease.Acquire(ctx, spec.Self)
		if err != nil || !won {
			logger.Warn("bootstrap lease not won: not bootstrapping this round", zap.Bool("won", won), zap.Error(err))

			return false, ctrl.write(ctx, r, bootstrap.PhaseWaiting, spec.Self, "waiting for the bootstrap lease")
		}

		committed, err := ctrl.Lease.Commit(ctx, spec.Self)
		if err != nil || !committed {
			logger.Warn("bootstrap lease lost before committing: not bootstrapping this round", zap.Bool("committed", committed), zap.Error(err))

			return false, ctrl.write(ctx, r, bootstrap.PhaseWaiting, spec.Self, "waiting for the bootstrap lease")
		}

		logger.Info("bootstrap lease won and committed: this node alone may bootstrap", zap.String("self", spec.Self))
	}

	logger.Info("bootstrapping etcd on this node", zap.String("self", spec.Self), zap.Int("round", spec.Round))

	if err := ctrl.write(ctx, r, bootstrap.PhaseBootstrapping, spec.Self, "calling Talos Bootstrap"); err != nil {
		return false, err
	}

	err = ctrl.Talos.Bootstrap(ctx, self)

	switch {
	case errors.Is(err, ErrAlreadyBootstrapped):
		logger.Info("etcd was already bootstrapped on this node (AlreadyExists): done", zap.String("self", spec.Self))
	case err != nil:
		logger.Error("Talos Bootstrap failed; retrying next round", zap.Error(err))

		return false, ctrl.write(ctx, r, bootstrap.PhaseWaiting, spec.Self, "Talos Bootstrap failed; retrying")
	default:
		logger.Info("bootstrapped etcd on this node", zap.String("self", spec.Self))
	}

	if ctrl.Lease != nil {
		if err := ctrl.Lease.Complete(ctx, spec.Self); err != nil {
			// The lease stays committed to this node: still exactly one.
			logger.Warn("reporting the bootstrap to the daemon failed; the lease stays with this node", zap.Error(err))
		}
	}

	return true, ctrl.write(ctx, r, bootstrap.PhaseBootstrapped, spec.Self, "this node bootstrapped etcd")
}

func (ctrl *BootstrapController) leaderHasEtcd(ctx context.Context, logger *zap.Logger, leader string) bool {
	addr, err := netip.ParseAddr(leader)
	if err != nil {
		return false
	}

	n, err := ctrl.Talos.EtcdMembers(ctx, addr)
	if err != nil {
		logger.Debug("etcd not up on the leader yet", zap.String("leader", leader), zap.Error(err))

		return false
	}

	return n > 0
}

func (ctrl *BootstrapController) write(ctx context.Context, r controller.Runtime, phase bootstrap.Phase, leader, message string) error {
	if err := safe.WriterModify(ctx, r, bootstrap.NewStatus(), func(res *bootstrap.Status) error {
		*res.TypedSpec() = bootstrap.StatusSpec{Phase: phase, Leader: leader, Message: message}

		return nil
	}); err != nil {
		return fmt.Errorf("writing the bootstrap status: %w", err)
	}

	return nil
}
