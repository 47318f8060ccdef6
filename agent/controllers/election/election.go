package election

import (
	"context"
	"fmt"

	"github.com/cosi-project/runtime/pkg/controller"
	"github.com/cosi-project/runtime/pkg/safe"
	"github.com/cosi-project/runtime/pkg/state"
	"go.uber.org/zap"

	"github.com/sovra-dev/sovra/agent/resources/discovery"
	"github.com/sovra-dev/sovra/agent/resources/election"
)

// ElectionController turns each discovery round into an Election.
type ElectionController struct {
	// ExpectedControlPlanes is the quorum: the control-plane count of the
	// cluster.
	ExpectedControlPlanes int
}

// Name implements controller.Controller.
func (ctrl *ElectionController) Name() string { return "election.ElectionController" }

// Inputs implements controller.Controller.
func (ctrl *ElectionController) Inputs() []controller.Input {
	return []controller.Input{{Namespace: discovery.NamespaceName, Type: discovery.RoundType, Kind: controller.InputWeak}}
}

// Outputs implements controller.Controller.
func (ctrl *ElectionController) Outputs() []controller.Output {
	return []controller.Output{{Type: election.ElectionType, Kind: controller.OutputExclusive}}
}

// Run implements controller.Controller.
func (ctrl *ElectionController) Run(ctx context.Context, r controller.Runtime, logger *zap.Logger) error {
	var (
		prev       *discovery.RoundSpec
		prevStable int
		last       election.ElectionSpec
	)

	for {
		select {
		case <-ctx.Done():
			return nil
		case <-r.EventCh():
		}

		round, err := safe.ReaderGetByID[*discovery.Round](ctx, r, discovery.RoundID)
		if err != nil {
			if state.IsNotFoundError(err) {
				continue
			}

			return fmt.Errorf("reading the discovery round: %w", err)
		}

		cur := round.TypedSpec().DeepCopy()
		if prev != nil && cur.Number == prev.Number {
			continue
		}

		result := Decide(prev, prevStable, cur, ctrl.ExpectedControlPlanes)
		prev, prevStable = &cur, result.StableRounds

		if err := safe.WriterModify(ctx, r, election.NewElection(), func(res *election.Election) error {
			*res.TypedSpec() = result

			return nil
		}); err != nil {
			return fmt.Errorf("writing the election: %w", err)
		}

		if result.Decision != last.Decision || result.Reason != last.Reason || result.Leader != last.Leader {
			logDecision(logger, result)
		}

		last = result
	}
}

func logDecision(logger *zap.Logger, e election.ElectionSpec) {
	fields := []zap.Field{
		zap.Int("round", e.Round),
		zap.String("decision", string(e.Decision)),
		zap.String("reason", e.Reason),
		zap.Int("candidates", len(e.Candidates)),
		zap.Int("quorum", e.Quorum),
		zap.Int("stable_rounds", e.StableRounds),
	}

	switch e.Decision {
	case election.DecisionLeader:
		logger.Info("elected this node to bootstrap etcd", append(fields, zap.String("leader", e.Leader))...)
	case election.DecisionFollower:
		logger.Info("elected another node to bootstrap etcd", append(fields, zap.String("leader", e.Leader))...)
	case election.DecisionEtcdExists:
		logger.Info("etcd already exists in the cluster: no election", append(fields, zap.String("etcd_peer", e.EtcdPeer))...)
	case election.DecisionWaiting:
		logger.Info("no leader yet", fields...)
	}
}
