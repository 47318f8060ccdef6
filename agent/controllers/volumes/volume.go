// Package volumes holds the controller that makes the agent's data volumes
// ready: once the node has passed an attestation in this boot, it fetches
// each volume's key over the node channel and formats (first use) or opens
// the LUKS2 volume, and publishes each volume's state.
package volumes

import (
	"context"
	"fmt"
	"time"

	"github.com/cosi-project/runtime/pkg/controller"
	"github.com/cosi-project/runtime/pkg/resource"
	"github.com/cosi-project/runtime/pkg/safe"
	"github.com/cosi-project/runtime/pkg/state"
	"go.uber.org/zap"

	"github.com/sovra-dev/sovra/agent/resources/attestation"
	"github.com/sovra-dev/sovra/agent/resources/volumes"
	"github.com/sovra-dev/sovra/agent/runtime/clock"
	agentvolumes "github.com/sovra-dev/sovra/agent/volumes"
)

// DefaultRetryInterval is how soon a volume that failed is tried again.
const DefaultRetryInterval = 30 * time.Second

// Preparer formats or opens one volume; *agentvolumes.Manager implements it.
type Preparer interface {
	Prepare(ctx context.Context, v agentvolumes.Volume, mapped string) (agentvolumes.Outcome, string, error)
}

// VolumeController makes Volumes ready after this boot's attestation.
type VolumeController struct {
	// Volumes are the data volumes the agent manages.
	Volumes []agentvolumes.Volume
	// Preparer formats or opens them.
	Preparer Preparer
	// MappedPrefix, when set, opens each volume at /dev/mapper/<prefix><id>;
	// empty only checks that the volume takes its key.
	MappedPrefix string
	// Clock paces retries; tests pass a fake.
	Clock clock.Clock
	// RetryInterval is how soon a failed volume is retried; zero means
	// DefaultRetryInterval.
	RetryInterval time.Duration
}

// Name implements controller.Controller.
func (ctrl *VolumeController) Name() string { return "volumes.VolumeController" }

// Inputs implements controller.Controller.
func (ctrl *VolumeController) Inputs() []controller.Input {
	return []controller.Input{{Namespace: attestation.NamespaceName, Type: attestation.StatusType, Kind: controller.InputWeak}}
}

// Outputs implements controller.Controller.
func (ctrl *VolumeController) Outputs() []controller.Output {
	return []controller.Output{{Type: volumes.StatusType, Kind: controller.OutputExclusive}}
}

// Run implements controller.Controller. A volume that is ready stays ready
// for the life of the agent (this boot); the others are tried on every
// attestation event and every RetryInterval while the node is attested.
func (ctrl *VolumeController) Run(ctx context.Context, r controller.Runtime, logger *zap.Logger) error {
	retryEvery := ctrl.RetryInterval
	if retryEvery <= 0 {
		retryEvery = DefaultRetryInterval
	}
	ready := map[string]volumes.StatusSpec{}
	var retry <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-r.EventCh():
		case <-retry:
		}
		retry = nil
		attested, err := ctrl.attested(ctx, r)
		if err != nil {
			return err
		}
		r.StartTrackingOutputs()
		for _, v := range ctrl.Volumes {
			spec, ok := ready[v.ID]
			if !ok {
				spec = ctrl.prepare(ctx, v, attested, logger)
				if spec.Phase == volumes.PhaseReady {
					ready[v.ID] = spec
				} else if attested {
					retry = ctrl.Clock.After(retryEvery)
				}
			}
			if err := safe.WriterModify(ctx, r, volumes.NewStatus(resource.ID(v.ID)), func(s *volumes.Status) error {
				*s.TypedSpec() = spec
				return nil
			}); err != nil {
				return fmt.Errorf("writing status of volume %s: %w", v.ID, err)
			}
		}
		if err := r.CleanupOutputs(ctx, resource.NewMetadata(volumes.NamespaceName, volumes.StatusType, "", resource.VersionUndefined)); err != nil {
			return fmt.Errorf("cleaning up volume statuses: %w", err)
		}
	}
}

// attested reports whether the node passed an attestation in this boot:
// the agent's attestation state lives in its memory, so it is this boot's.
func (ctrl *VolumeController) attested(ctx context.Context, r controller.Runtime) (bool, error) {
	st, err := safe.ReaderGetByID[*attestation.Status](ctx, r, attestation.StatusID)
	switch {
	case state.IsNotFoundError(err):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("reading the attestation status: %w", err)
	}
	return st.TypedSpec().Phase == attestation.PhaseAttested, nil
}

func (ctrl *VolumeController) prepare(ctx context.Context, v agentvolumes.Volume, attested bool, logger *zap.Logger) volumes.StatusSpec {
	spec := volumes.StatusSpec{Device: v.Device, LastAttempt: ctrl.Clock.Now().UTC().Format(time.RFC3339)}
	if !attested {
		spec.Phase, spec.Message = volumes.PhaseWaiting, "waiting for a passing attestation of this boot before asking for the key"
		return spec
	}
	mapped := ""
	if ctrl.MappedPrefix != "" {
		mapped = ctrl.MappedPrefix + v.ID
	}
	outcome, path, err := ctrl.Preparer.Prepare(ctx, v, mapped)
	if err != nil {
		logger.Warn("volume not ready", zap.String("volume", v.ID), zap.Error(err))
		spec.Phase, spec.Message = volumes.PhaseFailed, err.Error()
		return spec
	}
	spec.Phase, spec.Outcome, spec.MappedPath = volumes.PhaseReady, string(outcome), path
	spec.Message = "the volume took the key the daemon released after this boot's attestation"
	return spec
}
