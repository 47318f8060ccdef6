package bootsim

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	talosconfig "github.com/siderolabs/talos/pkg/machinery/config"
	"github.com/siderolabs/talos/pkg/machinery/config/configdiff"
	"github.com/siderolabs/talos/pkg/machinery/config/configloader"
	"github.com/siderolabs/talos/pkg/machinery/config/container"
	"github.com/siderolabs/talos/pkg/machinery/constants"
	metamachinery "github.com/siderolabs/talos/pkg/machinery/meta"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sovra-dev/sovra/tests/talosfake/volume"
)

// action ends a boot.
type action struct {
	reset *resetAction
}

// resetAction is what a Reset wipes.
type resetAction struct {
	graceful, reboot bool
	// labels are the system volumes to wipe; systemDisk wipes them all
	// (and META, and the installation of a boot-media machine).
	labels     []string
	systemDisk bool
}

// queue ends the boot with act: the boot sequence stops where it is, the
// services stop, and act is performed.
func (b *bootRun) queue(act action) bool {
	b.mu.Lock()
	if b.rebooting {
		b.mu.Unlock()

		return false
	}

	b.rebooting = true
	b.mu.Unlock()

	b.actions <- act
	b.interrupt()

	return true
}

// config is the configuration in force.
func (b *bootRun) config() talosconfig.Provider {
	b.mu.Lock()
	defer b.mu.Unlock()

	return b.cfg
}

// modeWrapper is the validation mode of an applied configuration: the
// platform's, where a machine that is installed no longer needs install
// instructions.
func (b *bootRun) applyMode() runtimeMode {
	return runtimeMode{name: metalMode.name, requiresInstall: !b.m.installed()}
}

// ApplyConfiguration implements talosfake.Lifecycle as machined does
// (v1alpha1_server.go): the loader loads and validates the configuration;
// reboot persists it and reboots; no-reboot and try apply it in place when
// the v1alpha1 changes allow it; auto picks one; staged only persists it.
func (b *bootRun) ApplyConfiguration(ctx context.Context, in *machine.ApplyConfigurationRequest) (*machine.ApplyConfiguration, error) {
	if !b.applyMu.TryLock() {
		return nil, status.Error(codes.FailedPrecondition, "another apply configuration is already in progress")
	}
	defer b.applyMu.Unlock()

	b.mu.Lock()
	rebooting := b.rebooting
	b.mu.Unlock()

	if rebooting {
		return nil, status.Error(codes.FailedPrecondition,
			"configuration was already applied and node is rebooting, cannot apply more configuration changes until next reboot")
	}

	mode := in.GetMode()
	modeName := mode.String()
	modeDetails := "Applied configuration with a reboot"
	modeErr := ""

	cfg, err := configloader.NewFromBytes(in.GetData())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}

	if cfg.RawV1Alpha1() == nil {
		return nil, status.Error(codes.InvalidArgument,
			"the applied machine configuration doesn't contain v1alpha1 config, did you mean to patch the machine config instead?")
	}

	vmode := b.applyMode()

	warnings, err := cfg.Validate(vmode)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}

	runtimeWarnings, err := cfg.RuntimeValidate(ctx, b.cosi, vmode)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}

	warnings = slices.Concat(warnings, runtimeWarnings)
	current := b.config()

	switch mode { //nolint:exhaustive
	case machine.ApplyConfigurationRequest_TRY, machine.ApplyConfigurationRequest_NO_REBOOT:
		if err := canApplyImmediate(current, cfg); err != nil {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}

		modeDetails = "Applied configuration without a reboot"
	case machine.ApplyConfigurationRequest_STAGED:
		modeDetails = "Staged configuration to be applied after the next reboot"
	case machine.ApplyConfigurationRequest_AUTO:
		if err := canApplyImmediate(current, cfg); err != nil {
			mode = machine.ApplyConfigurationRequest_REBOOT
			modeErr = ": " + err.Error()
		} else {
			mode = machine.ApplyConfigurationRequest_NO_REBOOT
			modeDetails = "Applied configuration without a reboot"
		}

		modeName = fmt.Sprintf("%s(%s)", modeName, mode)
	}

	if in.GetDryRun() {
		diff, err := configdiff.DiffConfigs(current, cfg)
		if err != nil {
			return nil, fmt.Errorf("failed to generate diff: %w", err)
		}

		if diff == "" {
			diff = "No changes."
		}

		return &machine.ApplyConfiguration{Mode: mode, ModeDetails: fmt.Sprintf("Dry run summary:\n%s (skipped in dry-run).\nConfig diff:\n\n%s", modeDetails, diff)}, nil
	}

	b.m.log.Info(MsgAppliedConfig, zap.Int("boot", b.num), zap.String("mode", strings.ToLower(modeName)))

	switch mode { //nolint:exhaustive
	case machine.ApplyConfigurationRequest_TRY:
		timeout := constants.ConfigTryTimeout
		if in.GetTryModeTimeout() != nil {
			timeout = in.GetTryModeTimeout().AsDuration()
		}

		modeDetails += fmt.Sprintf("\nThe config is applied in 'try' mode and will be automatically reverted back in %s", timeout)

		b.armRollback(timeout)
		b.applyLive(cfg)
	case machine.ApplyConfigurationRequest_NO_REBOOT:
		b.cancelRollback()

		if err := b.persist(cfg); err != nil {
			return nil, err
		}

		b.applyLive(cfg)
	case machine.ApplyConfigurationRequest_STAGED:
		b.cancelRollback()

		if err := b.persist(cfg); err != nil {
			return nil, err
		}
	case machine.ApplyConfigurationRequest_REBOOT:
		b.cancelRollback()

		if err := b.persist(cfg); err != nil {
			return nil, err
		}

		b.queue(action{})
	default:
		return nil, fmt.Errorf("incorrect mode '%s' specified for the apply config call", mode)
	}

	return &machine.ApplyConfiguration{Mode: mode, Warnings: warnings, ModeDetails: modeDetails + modeErr}, nil
}

// armRollback reverts a configuration applied in try mode to the persisted
// one after timeout.
func (b *bootRun) armRollback(timeout time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()

	if b.rollback != nil {
		b.rollback.Stop()
	}

	b.rollback = time.AfterFunc(timeout, func() {
		b.mu.Lock()
		persisted := b.persisted
		b.mu.Unlock()

		if persisted != nil {
			b.m.log.Info("rolling back the configuration applied in try mode", zap.Int("boot", b.num))
			b.applyLive(persisted)
		}
	})
}

func (b *bootRun) cancelRollback() {
	b.mu.Lock()
	defer b.mu.Unlock()

	if b.rollback != nil {
		b.rollback.Stop()
		b.rollback = nil
	}
}

// applyLive puts cfg in force without a reboot: the trusted roots, the
// firewall, the API's PKI, the hostname, and the extension services whose
// ExtensionServiceConfig changed restart.
func (b *bootRun) applyLive(cfg talosconfig.Provider) {
	b.mu.Lock()
	b.cfg = cfg
	srv := b.api
	exts := b.exts
	b.mu.Unlock()

	b.updateHostname(b.svcCtx, cfg)

	if srv != nil {
		fw := b.firewall(cfg)
		srv.api.setFirewall(fw)

		if srv.trustd != nil {
			srv.trustd.setFirewall(fw)
		}

		if srv.node != nil && cfg.Machine().Type().IsControlPlane() {
			sec := cfg.Machine().Security()
			if err := srv.node.SetPKI(sec.IssuingCA(), sec.AcceptedCAs(), nil); err != nil {
				b.m.log.Error("updating the Talos API's certificates", zap.Error(err))
			}
		}
	}

	for _, e := range exts {
		e.configChanged(cfg)
	}
}

// canApplyImmediate is Runtime.CanApplyImmediate: only the listed parts of
// the v1alpha1 document may change without a reboot (other documents
// always may).
func canApplyImmediate(current, cfg talosconfig.Provider) error {
	if current == nil {
		return errors.New("no current config")
	}

	currentConfig := current.RawV1Alpha1()
	if currentConfig == nil {
		return errors.New("current config is not v1alpha1")
	}

	newConfig := cfg.RawV1Alpha1()
	if newConfig == nil {
		return errors.New("new config is not v1alpha1")
	}

	newConfig = newConfig.DeepCopy()
	newConfig.ConfigDebug = currentConfig.ConfigDebug
	newConfig.ClusterConfig = currentConfig.ClusterConfig

	if newConfig.MachineConfig != nil && currentConfig.MachineConfig != nil {
		nm, cm := newConfig.MachineConfig, currentConfig.MachineConfig
		nm.MachineCA = cm.MachineCA
		nm.MachineAcceptedCAs = cm.MachineAcceptedCAs
		nm.MachineTime = cm.MachineTime //nolint:staticcheck
		nm.MachineCertSANs = cm.MachineCertSANs
		nm.MachineInstall = cm.MachineInstall
		nm.MachineNetwork = cm.MachineNetwork //nolint:staticcheck
		nm.MachineSysfs = cm.MachineSysfs
		nm.MachineSysctls = cm.MachineSysctls
		nm.MachineLogging = cm.MachineLogging
		nm.MachineControlPlane = cm.MachineControlPlane
		nm.MachineKubelet = cm.MachineKubelet
		nm.MachineKernel = cm.MachineKernel
		nm.MachineRegistries = cm.MachineRegistries //nolint:staticcheck
		nm.MachinePods = cm.MachinePods
		nm.MachineSeccompProfiles = cm.MachineSeccompProfiles
		nm.MachineNodeAnnotations = cm.MachineNodeAnnotations
		nm.MachineNodeLabels = cm.MachineNodeLabels
		nm.MachineNodeTaints = cm.MachineNodeTaints

		if nm.MachineFeatures != nil && cm.MachineFeatures != nil {
			nm.MachineFeatures.KubernetesTalosAPIAccessConfig = cm.MachineFeatures.KubernetesTalosAPIAccessConfig
			nm.MachineFeatures.KubePrismSupport = cm.MachineFeatures.KubePrismSupport
			nm.MachineFeatures.HostDNSSupport = cm.MachineFeatures.HostDNSSupport
			nm.MachineFeatures.ImageCacheSupport = cm.MachineFeatures.ImageCacheSupport
			nm.MachineFeatures.FeatureNodeAddressSortAlgorithm = cm.MachineFeatures.FeatureNodeAddressSortAlgorithm
		}
	}

	if !reflect.DeepEqual(currentConfig, newConfig) {
		diff, err := configdiff.DiffConfigs(container.NewV1Alpha1(currentConfig), container.NewV1Alpha1(newConfig))
		if err != nil {
			return fmt.Errorf("error calculating diff: %w", err)
		}

		return fmt.Errorf("this config change can't be applied in immediate mode\ndiff:\n%s", diff)
	}

	return nil
}

// Reboot implements talosfake.Lifecycle.
func (b *bootRun) Reboot(context.Context, *machine.RebootRequest) (*machine.Reboot, error) {
	actor := uuid.NewString()

	b.m.log.Info("reboot via API received", zap.Int("boot", b.num), zap.String("actor_id", actor))

	b.queue(action{})

	return &machine.Reboot{ActorId: actor}, nil
}

// Reset implements talosfake.Lifecycle as machined does: system partitions
// named must be located; none named wipes the whole system disk.
func (b *bootRun) Reset(_ context.Context, in *machine.ResetRequest) (*machine.Reset, error) {
	actor := uuid.NewString()

	b.m.log.Info("reset request received", zap.Int("boot", b.num), zap.String("actor_id", actor),
		zap.Bool("graceful", in.GetGraceful()), zap.Bool("reboot", in.GetReboot()))

	if len(in.GetUserDisksToWipe()) > 0 {
		if in.GetMode() == machine.ResetRequest_SYSTEM_DISK {
			return nil, errors.New("reset failed: invalid input, wipe mode SYSTEM_DISK doesn't support UserDisksToWipe parameter")
		}

		return nil, fmt.Errorf("reset user disk failed: device %s wasn't found", in.GetUserDisksToWipe()[0])
	}

	act := &resetAction{graceful: in.GetGraceful(), reboot: in.GetReboot()}

	if len(in.GetSystemPartitionsToWipe()) > 0 {
		if in.GetMode() == machine.ResetRequest_USER_DISKS {
			return nil, errors.New("reset failed: invalid input, wipe mode USER_DISKS doesn't support SystemPartitionsToWipe parameter")
		}

		for _, spec := range in.GetSystemPartitionsToWipe() {
			located, ok := b.located(spec.GetLabel())
			if !ok {
				return nil, fmt.Errorf("failed to get volume status with label %q: resource VolumeStatuses.block.talos.dev(block/%s@undefined) doesn't exist",
					spec.GetLabel(), spec.GetLabel())
			}

			if !located {
				return nil, fmt.Errorf("failed to reset: volume %q is not located", spec.GetLabel())
			}

			if spec.GetWipe() {
				act.labels = append(act.labels, spec.GetLabel())
			}
		}
	}

	act.systemDisk = in.GetMode() != machine.ResetRequest_USER_DISKS && len(in.GetSystemPartitionsToWipe()) == 0

	b.queue(action{reset: act})

	return &machine.Reset{ActorId: actor}, nil
}

// located reports whether a volume status exists for label and whether
// its partition was found.
func (b *bootRun) located(label string) (located, ok bool) {
	switch label {
	case constants.StatePartitionLabel:
		return b.state.Exists(), true
	case constants.EphemeralPartitionLabel:
		return b.eph.Exists(), true
	case constants.MetaPartitionLabel:
		return true, true
	default:
		return false, false
	}
}

// perform runs the sequence of act once the boot's services stopped.
func (b *bootRun) perform(act action) outcome {
	m := b.m

	if act.reset == nil {
		m.setPhase(PhaseRebooting, nil)
		m.log.Info(MsgRebooting, zap.Int("boot", b.num))
		b.shutdown()

		return outcomeReboot
	}

	r := act.reset

	m.setPhase(PhaseResetting, nil)

	if r.graceful && b.config() != nil && b.config().Machine().Type().IsControlPlane() {
		m.log.Info("leaving etcd", zap.Int("boot", b.num))
	}

	b.shutdown()

	if r.systemDisk {
		r.labels = []string{constants.StatePartitionLabel, constants.EphemeralPartitionLabel, constants.MetaPartitionLabel}
	}

	metaWiped, stateWiped := false, false

	for _, label := range r.labels {
		var err error

		switch label {
		case constants.StatePartitionLabel:
			err, stateWiped = b.state.Wipe(), true
		case constants.EphemeralPartitionLabel:
			err = b.eph.Wipe()
		case constants.MetaPartitionLabel:
			err, metaWiped = volume.Volume{Label: label, Dir: m.meta.dir}.Wipe(), true
		}

		if err != nil {
			m.log.Error("failed wiping partition", zap.String("volume", label), zap.Error(err))

			continue
		}

		m.log.Info(MsgWiped, zap.Int("boot", b.num), zap.String("volume", label))
	}

	if stateWiped && !metaWiped {
		if removed, err := m.meta.remove(metamachinery.StateEncryptionConfig); err != nil {
			m.log.Error("failed to remove state encryption META config tag", zap.Error(err))
		} else if removed {
			m.log.Info("reset the state encryption META config tag", zap.Int("boot", b.num))
		}
	}

	if r.systemDisk && m.cfg.BootMedia {
		_ = volume.Volume{Label: bootDir, Dir: filepath.Join(m.cfg.Dir, diskDir, bootDir)}.Wipe() //nolint:errcheck
	}

	m.log.Info(MsgReset, zap.Int("boot", b.num), zap.Strings("wiped", r.labels), zap.Bool("reboot", r.reboot))

	if !r.reboot {
		return outcomePowerOff
	}

	m.log.Info(MsgRebooting, zap.Int("boot", b.num))

	return outcomeReboot
}
