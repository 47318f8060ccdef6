package bootsim

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/siderolabs/talos/pkg/machinery/meta"
	"go.uber.org/zap"

	"github.com/sovra-dev/sovra/tests/talosfake/volume"
)

// Phase is where a boot is.
type Phase string

// Phases of a boot, in order; a boot may stop in any of the waiting ones.
const (
	PhaseBooting Phase = "booting"
	// PhaseUnlockingState waits for STATE to open (its KMS Unseal).
	PhaseUnlockingState Phase = "unlocking-state"
	// PhaseAcquiringConfig fetches talos.config= (or reads the embedded one).
	PhaseAcquiringConfig Phase = "acquiring-config"
	// PhaseConfigRefused had a configuration the loader refused; the
	// acquisition is retried.
	PhaseConfigRefused Phase = "config-refused"
	// PhaseMaintenance has no configuration source left (Talos's
	// maintenance mode, not simulated: the machine waits).
	PhaseMaintenance Phase = "maintenance"
	// PhaseProvisioningState creates STATE (its KMS Seal) and opens it.
	PhaseProvisioningState Phase = "provisioning-state"
	// PhaseInstalling installs Talos from the boot media, then reboots.
	PhaseInstalling Phase = "installing"
	// PhaseUnlockingEphemeral creates or opens EPHEMERAL.
	PhaseUnlockingEphemeral Phase = "unlocking-ephemeral"
	// PhaseRunning has the Talos API serving and the extension services
	// started.
	PhaseRunning Phase = "running"
	// PhaseRebooting and PhaseResetting stop the services.
	PhaseRebooting Phase = "rebooting"
	PhaseResetting Phase = "resetting"
	// PhasePoweredOff is the end: the machine stopped.
	PhasePoweredOff Phase = "powered-off"
)

// Log messages a story can wait for (one line per step).
const (
	MsgBootStarted     = "boot started"
	MsgStateMissing    = "STATE is missing"
	MsgSealed          = "sealed volume"
	MsgUnsealed        = "unsealed volume"
	MsgVolumeReady     = "volume ready"
	MsgVolumeFailed    = "volume not ready: retrying"
	MsgFetchedConfig   = "fetched config"
	MsgLoadedConfig    = "loaded config"
	MsgConfigRefused   = "config refused"
	MsgConfigStored    = "machine configuration persisted to STATE"
	MsgMaintenance     = "no configuration source: maintenance mode (not simulated), waiting"
	MsgInstalling      = "installing Talos to the system disk"
	MsgAPIServing      = "Talos API serving"
	MsgExtStarted      = "extension service started"
	MsgExtExited       = "extension service exited"
	MsgAppliedConfig   = "applied config"
	MsgRebooting       = "rebooting"
	MsgReset           = "reset"
	MsgWiped           = "wiped volume"
	MsgPoweredOff      = "powered off"
	MsgPhase           = "phase"
	MsgTrustdAsking    = "worker: asking trustd of the control-plane endpoint for the Talos API certificate"
	MsgTrustdCertified = "got the Talos API certificate from trustd"
)

// Status is the machine's current boot, in StatusFile.
type Status struct {
	// Boot counts the boots of this simulator's run, from 1.
	Boot int `json:"boot"`
	// BootID is the kernel's boot ID of the boot.
	BootID string `json:"bootID"`
	// BootTime is the boot's start (btime), Unix seconds.
	BootTime int64 `json:"bootTime"`
	// UUID is the machine's UUID in this boot (SMBIOS or META override).
	UUID  string `json:"uuid"`
	Phase Phase  `json:"phase"`
	// ConfigSource is where the configuration in force came from: state,
	// embedded or metal (talos.config=).
	ConfigSource string `json:"configSource,omitempty"`
	// Error is the reason of a waiting phase (a refused configuration, a
	// volume that does not open).
	Error string `json:"error,omitempty"`
}

// Machine is one simulated Talos machine.
type Machine struct {
	cfg  Config
	log  *zap.Logger
	meta metaStore

	// boots counts boots; lastBootTime keeps boot times increasing.
	boots        int
	lastBootTime int64

	// mu guards status.
	mu     sync.Mutex
	status Status
}

// New returns a machine; Run boots it.
func New(cfg Config) (*Machine, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}

	for _, d := range []string{cfg.Dir, filepath.Join(cfg.Dir, diskDir)} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("creating the machine's directory: %w", err)
		}
	}

	return &Machine{cfg: cfg, log: cfg.Logger, meta: metaStore{dir: MetaDir(cfg.Dir)}}, nil
}

// Status returns the machine's status.
func (m *Machine) Status() Status {
	m.mu.Lock()
	defer m.mu.Unlock()

	return m.status
}

// setPhase records the phase (and the reason of a waiting one) in the
// status file and the log.
func (m *Machine) setPhase(p Phase, reason error) {
	m.mu.Lock()
	m.status.Phase = p
	m.status.Error = ""

	if reason != nil {
		m.status.Error = reason.Error()
	}

	st := m.status
	m.mu.Unlock()

	fields := []zap.Field{zap.String("phase", string(p)), zap.Int("boot", st.Boot)}
	if reason != nil {
		fields = append(fields, zap.String("reason", reason.Error()))
	}

	m.log.Info(MsgPhase, fields...)
	m.writeStatus(st)
}

func (m *Machine) updateStatus(f func(*Status)) {
	m.mu.Lock()
	f(&m.status)
	st := m.status
	m.mu.Unlock()

	m.writeStatus(st)
}

func (m *Machine) writeStatus(st Status) {
	b, err := json.Marshal(st)
	if err != nil {
		return
	}

	tmp := filepath.Join(m.cfg.Dir, StatusFile+".tmp")
	if err := os.WriteFile(tmp, b, 0o600); err == nil {
		_ = os.Rename(tmp, filepath.Join(m.cfg.Dir, StatusFile)) //nolint:errcheck
	}
}

// Run boots the machine, and boots it again after every reboot, until ctx
// ends (the machine is switched off: its services are stopped) or a reset
// powers it off.
func (m *Machine) Run(ctx context.Context) error {
	defer func() {
		m.setPhase(PhasePoweredOff, nil)
		m.log.Info(MsgPoweredOff)
	}()

	for {
		next, err := m.boot(ctx)
		if err != nil {
			return err
		}

		if next == outcomePowerOff || ctx.Err() != nil {
			return nil
		}
	}
}

// outcome is how a boot ended.
type outcome int

const (
	outcomeReboot outcome = iota
	outcomePowerOff
)

// newBoot starts a boot: a new boot ID and boot time, and the kernel's
// files of the boot.
func (m *Machine) newBoot() (*bootRun, error) {
	m.boots++

	bt := time.Now().Unix()
	if bt <= m.lastBootTime {
		bt = m.lastBootTime + 1
	}

	m.lastBootTime = bt

	b := &bootRun{
		m: m, num: m.boots, id: uuid.NewString(), bootTime: bt,
		dir:     BootDir(m.cfg.Dir, m.boots),
		actions: make(chan action, 1),
		state:   volume.Volume{Label: stateLabel, Dir: StatePartition(m.cfg.Dir)},
		eph:     volume.Volume{Label: ephemeralLab, Dir: EphemeralPartition(m.cfg.Dir)},
	}

	if err := os.RemoveAll(b.dir); err != nil {
		return nil, fmt.Errorf("clearing boot %d: %w", b.num, err)
	}

	if err := b.writeKernelFiles(); err != nil {
		return nil, err
	}

	b.uuid = m.cfg.UUID
	if override, ok := m.meta.get(meta.UUIDOverride); ok && len(bytes.TrimSpace(override)) > 0 {
		b.uuid = string(bytes.TrimSpace(override))
	}

	m.updateStatus(func(s *Status) {
		*s = Status{Boot: b.num, BootID: b.id, BootTime: b.bootTime, UUID: b.uuid}
	})

	return b, nil
}

// rootPath is path in the boot's view of the machine's root filesystem
// (the kernel's files, /dev, /system); /var is EPHEMERAL.
func (b *bootRun) rootPath(path string) string {
	if rel, err := filepath.Rel("/var", path); err == nil && !startsWithDotDot(rel) {
		return filepath.Join(b.eph.Data(), rel)
	}

	return filepath.Join(b.dir, "root", path)
}

func startsWithDotDot(rel string) bool {
	return rel == ".." || (len(rel) >= 3 && rel[:3] == "../")
}

// efiGlobalVariable is the vendor GUID of SecureBoot.
const efiGlobalVariable = "8be4df61-93ca-11d2-aa0d-00e098032b8c"

// writeKernelFiles writes what the kernel shows in this boot: the boot ID,
// /proc/stat with this boot's btime, securityfs (lockdown, the TPM event
// log), efivarfs (SecureBoot), and the machine's devices.
func (b *bootRun) writeKernelFiles() error {
	cfg := b.m.cfg

	files := map[string][]byte{
		"/proc/sys/kernel/random/boot_id": []byte(b.id + "\n"),
		"/proc/stat":                      procStat(b.bootTime),
		"/sys/kernel/security/lockdown":   []byte(cfg.Lockdown + "\n"),
	}

	if cfg.EventLog != "" {
		log, err := os.ReadFile(cfg.EventLog)
		if err != nil {
			return fmt.Errorf("reading the TPM event log: %w", err)
		}

		files["/sys/kernel/security/tpm0/binary_bios_measurements"] = log
	}

	if cfg.SecureBoot != "" {
		value := byte(0)
		if cfg.SecureBoot == "enabled" {
			value = 1
		}

		// Attributes NV|BS|RT, then the value.
		files["/sys/firmware/efi/efivars/SecureBoot-"+efiGlobalVariable] = []byte{0x06, 0, 0, 0, value}
	}

	for _, d := range cfg.Devices {
		files[d] = nil
	}

	for path, content := range files {
		p := filepath.Join(b.dir, "root", path)

		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return fmt.Errorf("writing the kernel's files: %w", err)
		}

		if err := os.WriteFile(p, content, 0o444); err != nil {
			return fmt.Errorf("writing the kernel's files: %w", err)
		}
	}

	return nil
}

// procStat is this host's /proc/stat with btime set to bootTime.
func procStat(bootTime int64) []byte {
	host, err := os.ReadFile("/proc/stat")
	if err != nil {
		return []byte("btime " + strconv.FormatInt(bootTime, 10) + "\n")
	}

	var out bytes.Buffer

	sc := bufio.NewScanner(bytes.NewReader(host))
	for sc.Scan() {
		line := sc.Text()
		if len(line) > 6 && line[:6] == "btime " {
			line = "btime " + strconv.FormatInt(bootTime, 10)
		}

		out.WriteString(line + "\n")
	}

	return out.Bytes()
}

// boot runs one boot until it reboots, resets or ctx ends.
func (m *Machine) boot(ctx context.Context) (outcome, error) {
	b, err := m.newBoot()
	if err != nil {
		return outcomePowerOff, err
	}

	m.log.Info(MsgBootStarted, zap.Int("boot", b.num), zap.String("boot_id", b.id),
		zap.Int64("boot_time", b.bootTime), zap.String("uuid", b.uuid))
	m.setPhase(PhaseBooting, nil)

	seqCtx, cancel := context.WithCancel(ctx)
	b.interrupt = cancel

	defer cancel()

	err = b.sequence(seqCtx)

	switch {
	case errors.Is(err, errInstalled):
		b.shutdown()

		m.log.Info(MsgRebooting, zap.Int("boot", b.num), zap.String("reason", "installed"))

		return outcomeReboot, nil
	case err != nil && seqCtx.Err() == nil:
		b.shutdown()

		return outcomePowerOff, err
	case err == nil:
		m.setPhase(PhaseRunning, nil)
	}

	<-seqCtx.Done()

	var act action

	select {
	case act = <-b.actions:
	default:
		// Switched off.
		b.shutdown()

		return outcomePowerOff, nil
	}

	return b.perform(act), nil
}
