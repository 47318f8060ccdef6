// Package attestation holds the controller that keeps this node attested:
// it enrolls the TPM with the daemon, attests on start and every interval,
// retries with backoff and jitter while the daemon is unreachable, re-enrolls
// when the daemon no longer knows the node, and publishes the outcome.
package attestation

import (
	"context"
	"fmt"
	"time"

	"github.com/cosi-project/runtime/pkg/controller"
	"github.com/cosi-project/runtime/pkg/safe"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentattest "github.com/sovra-dev/sovra/agent/attest"
	"github.com/sovra-dev/sovra/agent/daemonconn"
	"github.com/sovra-dev/sovra/agent/resources/attestation"
	"github.com/sovra-dev/sovra/agent/runtime/clock"
)

// DefaultInterval is the default of the agent's --attest-interval.
const DefaultInterval = 10 * time.Minute

// Attester enrolls and attests the node; *agentattest.Agent implements it.
type Attester interface {
	Enroll(ctx context.Context) error
	Attest(ctx context.Context) (*agentattest.Credential, error)
	NodeName() string
}

// AttestationController attests on start and every Interval.
type AttestationController struct {
	Attester Attester
	// Clock paces attestations; tests pass a fake.
	Clock clock.Clock
	// Interval between attestations; zero means DefaultInterval. The
	// controller attests sooner when the credential would expire first.
	Interval time.Duration
	// Backoff retries calls that failed because the daemon was unreachable.
	Backoff daemonconn.Backoff
}

// Name implements controller.Controller.
func (ctrl *AttestationController) Name() string { return "attestation.AttestationController" }

// Inputs implements controller.Controller.
func (ctrl *AttestationController) Inputs() []controller.Input { return nil }

// Outputs implements controller.Controller.
func (ctrl *AttestationController) Outputs() []controller.Output {
	return []controller.Output{{Type: attestation.StatusType, Kind: controller.OutputExclusive}}
}

// Run implements controller.Controller.
func (ctrl *AttestationController) Run(ctx context.Context, r controller.Runtime, logger *zap.Logger) error {
	interval := ctrl.Interval
	if interval <= 0 {
		interval = DefaultInterval
	}
	var (
		enrolled    bool
		lastSuccess string
	)
	for {
		wait := interval
		spec := attestation.StatusSpec{LastAttempt: ctrl.Clock.Now().UTC().Format(time.RFC3339), LastSuccess: lastSuccess}
		if !enrolled {
			err := ctrl.Backoff.Do(ctx, ctrl.Attester.Enroll)
			if ctx.Err() != nil {
				return nil //nolint:nilerr // shutting down
			}
			if err != nil {
				logger.Warn("enrollment failed", zap.Error(err))
				spec.Phase, spec.Message = phaseOf(err), "enrollment failed: "+message(err)
			} else {
				enrolled = true
			}
		}
		if enrolled {
			var cred *agentattest.Credential
			err := ctrl.Backoff.Do(ctx, func(ctx context.Context) error {
				var err error
				cred, err = ctrl.Attester.Attest(ctx)
				return err
			})
			if ctx.Err() != nil {
				return nil //nolint:nilerr // shutting down
			}
			switch {
			case err == nil:
				lastSuccess = ctrl.Clock.Now().UTC().Format(time.RFC3339)
				spec.Phase, spec.LastSuccess = attestation.PhaseAttested, lastSuccess
				spec.CredentialExpires = cred.Expires.UTC().Format(time.RFC3339)
				spec.Message, spec.Warnings = "attested; node credential issued", cred.Warnings
				// Renew before the credential lapses.
				if left := cred.Expires.Sub(ctrl.Clock.Now()) / 2; left > 0 && left < wait {
					wait = left
				}
			case status.Code(err) == codes.NotFound:
				logger.Warn("the daemon does not know this node: enrolling again", zap.Error(err))
				enrolled = false
				spec.Phase, spec.Message, wait = attestation.PhaseEnrolling, "the daemon does not know this node; enrolling again", 0
			default:
				logger.Warn("attestation failed", zap.Error(err))
				spec.Phase, spec.Message = phaseOf(err), "attestation failed: "+message(err)
			}
		}
		spec.Node = ctrl.Attester.NodeName()
		if err := safe.WriterModify(ctx, r, attestation.NewStatus(), func(s *attestation.Status) error {
			*s.TypedSpec() = spec
			return nil
		}); err != nil {
			return fmt.Errorf("writing attestation status: %w", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-ctrl.Clock.After(wait):
		}
	}
}

func phaseOf(err error) attestation.Phase {
	if daemonconn.Retryable(err) {
		return attestation.PhaseUnreachable
	}
	return attestation.PhaseRefused
}

// message is the daemon's explanation when there is one.
func message(err error) string {
	if s, ok := status.FromError(err); ok {
		return s.Message()
	}
	return err.Error()
}
