// Package host holds the controller of host mode: on a machine of sovra's
// pool, once the node has passed an attestation in this boot, it reads the
// machine's hardware from the local Talos API, reports it with the
// configuration the machine runs to the daemon's host service (Sync), and
// does what the daemon answers: wait, apply the released machine
// configuration (Talos reboots into it), or reset (Talos wipes STATE and
// EPHEMERAL and reboots into the enrollment configuration). It syncs again
// after every attestation and when the daemon says to.
//
// The configuration is handed to Talos and nowhere else: it is never
// logged, written to the status or put in an error. What was applied or
// reset in this boot is recorded (the boot ID, the generation and the
// configuration's SHA-256) so that a restarted agent does not do it twice.
package host

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/cosi-project/runtime/pkg/controller"
	"github.com/cosi-project/runtime/pkg/safe"
	"github.com/cosi-project/runtime/pkg/state"
	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/sovra-dev/sovra/agent/resources/attestation"
	"github.com/sovra-dev/sovra/agent/resources/host"
	"github.com/sovra-dev/sovra/agent/runtime/clock"
	"github.com/sovra-dev/sovra/internal/hostapi"
)

// Defaults of the controller's pacing.
const (
	// DefaultMinSync and DefaultMaxSync bound the daemon's retry_seconds.
	DefaultMinSync = 5 * time.Second
	DefaultMaxSync = 5 * time.Minute
	// DefaultBackoffBase is the wait after the first failure; it doubles
	// with every further one, up to the maximum sync interval.
	DefaultBackoffBase = 5 * time.Second
	// DefaultBootIDPath is the kernel's boot ID, which attestation reports.
	DefaultBootIDPath = "/proc/sys/kernel/random/boot_id"
	// MarkerFile, in the agent's state directory, records what was applied
	// or reset in this boot.
	MarkerFile = "host-action.json"

	markerMode = 0o600
)

// Talos is the local Talos API; *talosapi.Client implements it.
type Talos interface {
	// Hardware reads the machine's architecture, CPUs, memory and disks.
	Hardware(ctx context.Context) (*hostapi.Hardware, error)
	// ApplyConfiguration applies config and reboots into it.
	ApplyConfiguration(ctx context.Context, config []byte) error
	// Reset wipes STATE and EPHEMERAL and reboots.
	Reset(ctx context.Context) error
}

// Conn is the connection to the daemon's host service: *daemonconn.Conn,
// which presents the node credential of this boot's last passing
// attestation and bounds each call.
type Conn interface {
	grpc.ClientConnInterface
	// HasCredential reports whether a call now presents a node credential.
	HasCredential() bool
}

// HostController runs host mode.
type HostController struct {
	// Conn reaches the daemon's host service.
	Conn Conn
	// Talos is the local Talos API.
	Talos Talos
	// Generation is the generation of the configuration the machine runs
	// (SOVRA_HOST_GENERATION); zero: the enrollment configuration.
	Generation int64
	// Clock paces syncs and retries; tests pass a fake.
	Clock clock.Clock
	// StateDir holds the record of what was applied or reset in this boot;
	// empty keeps it in memory only.
	StateDir string
	// BootIDPath is this boot's ID; empty means DefaultBootIDPath. When it
	// cannot be read, the record is kept in memory only.
	BootIDPath string
	// MinSync and MaxSync bound the interval between syncs; zero means
	// DefaultMinSync and DefaultMaxSync.
	MinSync, MaxSync time.Duration
	// BackoffBase is the first wait after a failure; zero means
	// DefaultBackoffBase.
	BackoffBase time.Duration
}

// Name implements controller.Controller.
func (ctrl *HostController) Name() string { return "host.HostController" }

// Inputs implements controller.Controller.
func (ctrl *HostController) Inputs() []controller.Input {
	return []controller.Input{{Namespace: attestation.NamespaceName, Type: attestation.StatusType, Kind: controller.InputWeak}}
}

// Outputs implements controller.Controller.
func (ctrl *HostController) Outputs() []controller.Output {
	return []controller.Output{{Type: host.StatusType, Kind: controller.OutputExclusive}}
}

// done is what the agent did in a boot: the action, and for an apply the
// generation and the configuration's digest.
type done struct {
	Boot       string `json:"boot"`
	Action     string `json:"action"`
	Generation int64  `json:"generation,omitempty"`
	Digest     string `json:"sha256,omitempty"`
}

// Actions recorded in done.
const (
	actionApply = "apply"
	actionReset = "reset"
)

// run is the state of one Run: the record, the hardware once read, the
// failures in a row, the last status and the daemon's last answer.
type run struct {
	boot     string
	did      done
	hardware *hostapi.Hardware
	failures int
	spec     host.StatusSpec
	// answer is the daemon's last answer (action and message), logged
	// when it changes.
	answer string
}

// Run implements controller.Controller. It syncs on every attestation
// event while the node is attested, and when the last sync's wait ends.
func (ctrl *HostController) Run(ctx context.Context, r controller.Runtime, logger *zap.Logger) error {
	st := &run{spec: host.StatusSpec{Mode: host.ModeEnrollment, Generation: ctrl.Generation}}
	if ctrl.Generation > 0 {
		st.spec.Mode = host.ModeConfigured
	}
	st.boot, st.did = ctrl.loadRecord(logger)
	if st.did.Action == actionApply {
		st.spec.AppliedGeneration = st.did.Generation
	}

	var next <-chan time.Time

	for {
		select {
		case <-ctx.Done():
			return nil
		case <-r.EventCh():
		case <-next:
		}

		next = nil

		attested, err := ctrl.attested(ctx, r)
		if err != nil {
			return err
		}

		if attested {
			next = ctrl.Clock.After(ctrl.sync(ctx, st, logger))
		} else {
			st.spec.Phase = host.PhaseWaitingAttestation
			st.spec.Message = "waiting for a passing attestation of this boot before syncing with the daemon"
		}

		if ctx.Err() != nil {
			return nil
		}

		if err := safe.WriterModify(ctx, r, host.NewStatus(), func(s *host.Status) error {
			*s.TypedSpec() = st.spec
			return nil
		}); err != nil {
			return fmt.Errorf("writing host status: %w", err)
		}
	}
}

// attested reports whether the node passed an attestation in this boot and
// holds its node credential.
func (ctrl *HostController) attested(ctx context.Context, r controller.Runtime) (bool, error) {
	st, err := safe.ReaderGetByID[*attestation.Status](ctx, r, attestation.StatusID)
	switch {
	case state.IsNotFoundError(err):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("reading the attestation status: %w", err)
	}

	return st.TypedSpec().Phase == attestation.PhaseAttested && ctrl.Conn.HasCredential(), nil
}

// sync reports to the daemon and does what it answers. It returns the wait
// before the next sync.
func (ctrl *HostController) sync(ctx context.Context, st *run, logger *zap.Logger) time.Duration {
	if st.hardware == nil {
		hw, err := ctrl.Talos.Hardware(ctx)
		if err != nil {
			return ctrl.fail(st, logger, "reading the hardware from the local Talos API", err)
		}

		st.hardware = hw
		st.spec.Architecture, st.spec.CPUs, st.spec.MemoryBytes, st.spec.Disks = hw.GetArchitecture(), hw.GetCpus(), hw.GetMemoryBytes(), len(hw.GetDisks())
		logger.Info("hardware read from the local Talos API", zap.String("arch", hw.GetArchitecture()), zap.Uint32("cpus", hw.GetCpus()),
			zap.Uint64("memoryBytes", hw.GetMemoryBytes()), zap.Int("disks", len(hw.GetDisks())))
	}

	mode := hostapi.Mode_MODE_ENROLLMENT
	if ctrl.Generation > 0 {
		mode = hostapi.Mode_MODE_CONFIGURED
	}

	resp, err := hostapi.NewHostServiceClient(ctrl.Conn).Sync(ctx, &hostapi.SyncRequest{Mode: mode, Generation: ctrl.Generation, Hardware: st.hardware})
	if err != nil {
		return ctrl.fail(st, logger, "syncing with the daemon's host service", err)
	}

	action := resp.GetAction()
	if answer := actionName(action) + ": " + resp.GetMessage(); answer != st.answer {
		st.answer = answer
		logger.Info("the daemon's host service answered", zap.String("action", actionName(action)), zap.String("message", resp.GetMessage()),
			zap.Int64("generation", resp.GetGeneration()))
	}

	st.spec.LastSync = ctrl.Clock.Now().UTC().Format(time.RFC3339)
	st.spec.LastAction = actionName(action)
	st.spec.Message = resp.GetMessage()
	wait := ctrl.bound(time.Duration(resp.GetRetrySeconds()) * time.Second)

	switch action {
	case hostapi.Action_ACTION_APPLY:
		if err := ctrl.apply(ctx, st, resp, logger); err != nil {
			return ctrl.fail(st, logger, fmt.Sprintf("applying configuration generation %d", resp.GetGeneration()), err)
		}
	case hostapi.Action_ACTION_RESET:
		if err := ctrl.reset(ctx, st, logger); err != nil {
			return ctrl.fail(st, logger, "resetting the machine", err)
		}
	case hostapi.Action_ACTION_NONE:
		st.spec.Phase = host.PhaseRunning
	default:
		st.spec.Phase = host.PhaseWaiting
	}

	if st.failures > 0 {
		logger.Info("host sync recovered", zap.Int("failures", st.failures))
	}

	st.failures, st.spec.Error = 0, ""

	return wait
}

// apply applies the released configuration once in this boot.
func (ctrl *HostController) apply(ctx context.Context, st *run, resp *hostapi.SyncResponse, logger *zap.Logger) error {
	config, gen := resp.GetConfig(), resp.GetGeneration()
	if len(config) == 0 {
		return errors.New("the daemon answered apply without a configuration")
	}

	sum := sha256.Sum256(config)
	want := done{Boot: st.boot, Action: actionApply, Generation: gen, Digest: hex.EncodeToString(sum[:])}

	if st.did == want {
		st.spec.Phase = host.PhaseApplied
		st.spec.Message = fmt.Sprintf("generation %d was applied in this boot; waiting for Talos to reboot into it", gen)

		return nil
	}

	if err := ctrl.Talos.ApplyConfiguration(ctx, config); err != nil {
		return err
	}

	st.did = want
	ctrl.saveRecord(st.did, logger)
	st.spec.Phase, st.spec.AppliedGeneration = host.PhaseApplied, gen
	logger.Info("machine configuration applied: Talos reboots into it", zap.Int64("generation", gen), zap.Int("bytes", len(config)))

	return nil
}

// reset resets the machine once in this boot.
func (ctrl *HostController) reset(ctx context.Context, st *run, logger *zap.Logger) error {
	want := done{Boot: st.boot, Action: actionReset}
	if st.did == want {
		st.spec.Phase = host.PhaseReset
		st.spec.Message = "the reset was requested in this boot; waiting for Talos to wipe STATE and EPHEMERAL and reboot"

		return nil
	}

	if err := ctrl.Talos.Reset(ctx); err != nil {
		return err
	}

	st.did = want
	ctrl.saveRecord(st.did, logger)
	st.spec.Phase = host.PhaseReset
	logger.Info("machine released: Talos wipes STATE and EPHEMERAL and reboots into the enrollment configuration")

	return nil
}

// fail records a failure and returns the backoff before the next try.
func (ctrl *HostController) fail(st *run, logger *zap.Logger, what string, err error) time.Duration {
	st.failures++
	st.spec.Phase = host.PhaseFailed
	st.spec.Error = what + ": " + err.Error()

	base := ctrl.BackoffBase
	if base <= 0 {
		base = DefaultBackoffBase
	}

	wait := base
	for i := 1; i < st.failures && wait < ctrl.maxSync(); i++ {
		wait *= 2
	}

	wait = min(wait, ctrl.maxSync())
	logger.Warn("host sync failed; retrying", zap.String("step", what), zap.Error(err), zap.Int("failures", st.failures), zap.Duration("retryIn", wait))

	return wait
}

// bound clamps the daemon's retry interval.
func (ctrl *HostController) bound(d time.Duration) time.Duration {
	lo := ctrl.MinSync
	if lo <= 0 {
		lo = DefaultMinSync
	}

	return min(max(d, lo), ctrl.maxSync())
}

func (ctrl *HostController) maxSync() time.Duration {
	if ctrl.MaxSync <= 0 {
		return DefaultMaxSync
	}

	return ctrl.MaxSync
}

func actionName(a hostapi.Action) string {
	switch a {
	case hostapi.Action_ACTION_WAIT:
		return "wait"
	case hostapi.Action_ACTION_APPLY:
		return actionApply
	case hostapi.Action_ACTION_RESET:
		return actionReset
	case hostapi.Action_ACTION_NONE:
		return "none"
	case hostapi.Action_ACTION_UNSPECIFIED:
	}

	return "unspecified"
}

// loadRecord reads this boot's ID and what was done in it. Without a boot
// ID or a state directory the record lives in memory only.
func (ctrl *HostController) loadRecord(logger *zap.Logger) (string, done) {
	path := ctrl.BootIDPath
	if path == "" {
		path = DefaultBootIDPath
	}

	b, err := os.ReadFile(path)
	if err != nil {
		logger.Warn("no boot ID: what host mode applies is remembered only until the agent restarts", zap.Error(err))

		return "", done{}
	}

	boot := strings.TrimSpace(string(b))
	if ctrl.StateDir == "" || boot == "" {
		return boot, done{}
	}

	var did done

	b, err = os.ReadFile(filepath.Join(ctrl.StateDir, MarkerFile))
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		logger.Warn("reading what host mode did in this boot", zap.Error(err))
	case json.Unmarshal(b, &did) != nil:
		logger.Warn("ignoring a malformed host mode record", zap.String("file", MarkerFile))
	case did.Boot == boot:
		logger.Info("host mode already acted in this boot", zap.String("action", did.Action), zap.Int64("generation", did.Generation))

		return boot, did
	}

	return boot, done{}
}

// saveRecord records what was done in this boot; a failure to write it is
// logged: the worst outcome is the same action again after a restart.
func (ctrl *HostController) saveRecord(did done, logger *zap.Logger) {
	if ctrl.StateDir == "" || did.Boot == "" {
		return
	}

	b, err := json.Marshal(did)
	if err == nil {
		err = os.MkdirAll(ctrl.StateDir, 0o700)
	}

	if err == nil {
		tmp := filepath.Join(ctrl.StateDir, "."+MarkerFile)
		if err = os.WriteFile(tmp, b, markerMode); err == nil {
			err = os.Rename(tmp, filepath.Join(ctrl.StateDir, MarkerFile))
		}
	}

	if err != nil {
		logger.Warn("recording what host mode did in this boot", zap.Error(err))
	}
}
