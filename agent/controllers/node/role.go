// Package node holds the controllers that describe this node: its role.
package node

import (
	"context"
	"fmt"
	"time"

	"github.com/cosi-project/runtime/pkg/controller"
	"github.com/cosi-project/runtime/pkg/safe"
	"go.uber.org/zap"

	"github.com/sovra-dev/sovra/agent/config"
	"github.com/sovra-dev/sovra/agent/resources/node"
	"github.com/sovra-dev/sovra/agent/runtime/clock"
)

// Machine types as Talos names them.
const (
	machineTypeControlPlane = "controlplane"
	machineTypeInit         = "init"
)

// MachineTypeReader reads this node's Talos machine type (controlplane, init
// or worker) from the local Talos API.
type MachineTypeReader interface {
	MachineType(ctx context.Context) (string, error)
}

// RoleController publishes the node's Role: from the configuration when it
// names one, else from the local Talos API, retried until Talos answers.
type RoleController struct {
	// Role is the configured role; RoleAuto asks Reader.
	Role config.Role
	// Reader reads the machine type; only used with RoleAuto.
	Reader MachineTypeReader
	// Clock paces the retries.
	Clock clock.Clock
	// RetryInterval is the wait between failed reads.
	RetryInterval time.Duration
}

// Name implements controller.Controller.
func (ctrl *RoleController) Name() string { return "node.RoleController" }

// Inputs implements controller.Controller.
func (ctrl *RoleController) Inputs() []controller.Input { return nil }

// Outputs implements controller.Controller.
func (ctrl *RoleController) Outputs() []controller.Output {
	return []controller.Output{{Type: node.RoleType, Kind: controller.OutputExclusive}}
}

// Run implements controller.Controller. It returns once the role is known.
func (ctrl *RoleController) Run(ctx context.Context, r controller.Runtime, logger *zap.Logger) error {
	if ctrl.Role != config.RoleAuto {
		return ctrl.publish(ctx, r, logger, string(ctrl.Role), "config")
	}

	for attempt := 1; ; attempt++ {
		machineType, err := ctrl.Reader.MachineType(ctx)
		if err == nil {
			return ctrl.publish(ctx, r, logger, machineType, "talos")
		}

		if attempt == 1 || attempt%10 == 0 {
			logger.Warn("reading the machine type from the local Talos API failed; retrying", zap.Int("attempt", attempt), zap.Error(err))
		}

		select {
		case <-ctx.Done():
			return nil
		case <-ctrl.Clock.After(ctrl.RetryInterval):
		}
	}
}

func (ctrl *RoleController) publish(ctx context.Context, r controller.Runtime, logger *zap.Logger, machineType, source string) error {
	controlPlane := machineType == machineTypeControlPlane || machineType == machineTypeInit

	if err := safe.WriterModify(ctx, r, node.NewRole(), func(res *node.Role) error {
		*res.TypedSpec() = node.RoleSpec{MachineType: machineType, ControlPlane: controlPlane, Source: source}

		return nil
	}); err != nil {
		return fmt.Errorf("writing the node role: %w", err)
	}

	logger.Info("node role known", zap.String("machine_type", machineType), zap.Bool("control_plane", controlPlane), zap.String("source", source))

	return nil
}
