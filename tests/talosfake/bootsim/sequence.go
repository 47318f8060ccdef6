package bootsim

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/cosi-project/runtime/pkg/safe"
	"github.com/cosi-project/runtime/pkg/state"
	"github.com/cosi-project/runtime/pkg/state/impl/inmem"
	"github.com/cosi-project/runtime/pkg/state/impl/namespaced"
	talosconfig "github.com/siderolabs/talos/pkg/machinery/config"
	"github.com/siderolabs/talos/pkg/machinery/config/config"
	"github.com/siderolabs/talos/pkg/machinery/constants"
	"github.com/siderolabs/talos/pkg/machinery/meta"
	"github.com/siderolabs/talos/pkg/machinery/resources/network"
	"github.com/siderolabs/talos/pkg/machinery/resources/secrets"
	"go.uber.org/zap"
	"go.yaml.in/yaml/v4"

	"github.com/sovra-dev/sovra/tests/talosfake"
	"github.com/sovra-dev/sovra/tests/talosfake/volume"
)

// errInstalled ends an installation boot: the machine reboots from disk.
var errInstalled = errors.New("installed")

// Sources of a configuration (AcquireController's configSourcesUsed).
const (
	sourceState    = "state"
	sourceEmbedded = "embedded"
	sourceMetal    = constants.PlatformMetal
)

// bootRun is one boot of the machine.
type bootRun struct {
	m        *Machine
	num      int
	id       string
	bootTime int64
	uuid     string
	// dir holds the boot's files.
	dir string

	state, eph volume.Volume
	// cosi is the machine's resource state in this boot.
	cosi state.State

	// actions gets the one lifecycle action (reboot, reset) that ends the
	// boot; interrupt then stops the boot sequence if it still runs.
	actions   chan action
	interrupt context.CancelFunc

	// svcCtx lives until shutdown: the API and the services run in it.
	svcCtx    context.Context //nolint:containedctx
	svcCancel context.CancelFunc
	// services are the goroutines of the API and the extension services.
	services sync.WaitGroup

	// applyMu serializes ApplyConfiguration calls.
	applyMu sync.Mutex

	// mu guards the fields below.
	mu sync.Mutex
	// cfg is the configuration in force; persisted is the one in STATE.
	cfg, persisted talosconfig.Provider
	source         string
	stateOpen      bool
	// rebooting is set once an action is queued: no more applies.
	rebooting bool
	api       *apiServer
	exts      []*extService
	rollback  *time.Timer
}

// sequence is the boot up to a running machine: STATE, the configuration,
// the volumes, the API, the extension services.
func (b *bootRun) sequence(ctx context.Context) error {
	m := b.m

	b.svcCtx, b.svcCancel = context.WithCancel(context.Background())
	b.cosi = state.WrapCore(namespaced.NewState(inmem.Build))

	if err := talosfake.CreateResources(ctx, b.cosi, m.resources(b.uuid, hostnameFor(b.uuid, m.cfg.MAC), m.meta.all())...); err != nil {
		return err
	}

	// STATE is opened before any configuration is read, with the
	// encryption settings META keeps (manageStateNoConfig).
	if b.state.Exists() {
		spec := volume.Spec{}

		if data, ok := m.meta.get(meta.StateEncryptionConfig); ok {
			var err error
			if spec, err = volume.UnmarshalMeta(data); err != nil {
				m.log.Warn("reading the STATE encryption config from META", zap.Error(err))
			}
		}

		if err := b.prepareVolume(ctx, b.state, spec, PhaseUnlockingState); err != nil {
			return err
		}

		b.mu.Lock()
		b.stateOpen = true
		b.mu.Unlock()
	} else {
		m.log.Info(MsgStateMissing, zap.Int("boot", b.num))
	}

	cfg, source, err := b.acquire(ctx)
	if err != nil {
		return err
	}

	if cfg == nil {
		m.log.Warn(MsgMaintenance, zap.Int("boot", b.num))
		m.setPhase(PhaseMaintenance, nil)
		<-ctx.Done()

		return ctx.Err()
	}

	m.log.Info(MsgLoadedConfig, zap.Int("boot", b.num), zap.String("source", source),
		zap.String("machine_type", cfg.Machine().Type().String()))

	b.mu.Lock()
	b.cfg, b.source = cfg, source

	if source == sourceState {
		b.persisted = cfg
	}
	b.mu.Unlock()

	m.updateStatus(func(s *Status) { s.ConfigSource = source })

	if err := b.setupStateEncryption(cfg); err != nil {
		return err
	}

	if !b.stateOpen {
		if err := b.prepareVolume(ctx, b.state, volume.SpecFromConfig(encryptionOf(cfg, constants.StatePartitionLabel)), PhaseProvisioningState); err != nil {
			return err
		}

		b.mu.Lock()
		b.stateOpen = true
		b.mu.Unlock()
	}

	if source != sourceState {
		if err := b.persist(cfg); err != nil {
			return err
		}
	}

	if m.cfg.BootMedia && !m.installed() {
		m.setPhase(PhaseInstalling, nil)
		m.log.Info(MsgInstalling, zap.Int("boot", b.num))

		if err := m.markInstalled(); err != nil {
			return err
		}

		return errInstalled
	}

	if err := b.startAPI(); err != nil {
		return err
	}

	if err := b.prepareVolume(ctx, b.eph, volume.SpecFromConfig(encryptionOf(cfg, constants.EphemeralPartitionLabel)), PhaseUnlockingEphemeral); err != nil {
		return err
	}

	return b.startExtensions()
}

// prepareVolume creates (when missing) and opens vol, retrying every
// VolumeRetry until it is ready or ctx ends; the phase shows the wait.
func (b *bootRun) prepareVolume(ctx context.Context, vol volume.Volume, spec volume.Spec, phase Phase) error {
	m := b.m
	helpers := volume.Helpers{UUID: b.uuid, Roots: b.roots, Salt: b.encryptionSalt}
	waiting := false

	for {
		res, err := vol.Prepare(ctx, spec, helpers, m.log.With(zap.Int("boot", b.num)))
		if err == nil {
			fields := []zap.Field{zap.Int("boot", b.num), zap.String("volume", vol.Label), zap.Bool("encrypted", spec.Encrypted())}

			if res.Formatted && spec.Encrypted() {
				m.log.Info(MsgSealed, fields...)
			}

			if spec.Encrypted() {
				m.log.Info(MsgUnsealed, append(fields, zap.Int("slot", res.Slot))...)
			}

			m.log.Info(MsgVolumeReady, append(fields, zap.Bool("created", res.Formatted))...)

			return nil
		}

		if ctx.Err() != nil {
			return ctx.Err()
		}

		m.log.Warn(MsgVolumeFailed, zap.Int("boot", b.num), zap.String("volume", vol.Label), zap.Error(err),
			zap.Duration("retry_in", m.cfg.VolumeRetry))

		if !waiting {
			m.setPhase(phase, err)

			waiting = true
		}

		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(m.cfg.VolumeRetry):
		}
	}
}

// encryptionSalt is STATE's encryption salt, which keys locked to STATE
// take: made once in STATE (encryption-salt.yaml) when STATE is first open
// (secrets.EncryptionSaltController); unavailable until then.
func (b *bootRun) encryptionSalt(context.Context) ([]byte, error) {
	b.mu.Lock()
	open := b.stateOpen
	b.mu.Unlock()

	if !open {
		return nil, errors.New("STATE is not open yet")
	}

	path := filepath.Join(b.state.Data(), constants.EncryptionSaltFilename)

	var salt secrets.EncryptionSaltSpec

	data, err := os.ReadFile(path)
	if err == nil {
		if err := yaml.Unmarshal(data, &salt); err != nil || len(salt.DiskSalt) == 0 {
			return nil, fmt.Errorf("error unmarshaling %q: %v", constants.EncryptionSaltFilename, err)
		}

		return salt.DiskSalt, nil
	}

	if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("error reading state file %q: %w", constants.EncryptionSaltFilename, err)
	}

	salt.DiskSalt = make([]byte, constants.DiskEncryptionSaltSize)
	if _, err := rand.Read(salt.DiskSalt); err != nil {
		return nil, err
	}

	if data, err = yaml.Marshal(&salt); err != nil {
		return nil, err
	}

	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("error creating state file %q: %w", constants.EncryptionSaltFilename, err)
	}
	defer f.Close() //nolint:errcheck

	if _, err := f.Write(data); err != nil {
		return nil, err
	}

	b.m.log.Info("encryption salt established", zap.Int("boot", b.num))

	return salt.DiskSalt, f.Close()
}

// encryptionOf is the encryption of the system volume label in cfg: its
// VolumeConfig document, else machine.systemDiskEncryption.
func encryptionOf(cfg config.Config, label string) config.EncryptionConfig {
	if vc, ok := cfg.Volumes().ByName(label); ok {
		if enc := vc.Encryption(); !isNilEncryption(enc) {
			return enc
		}
	}

	if cfg.Machine() == nil {
		return nil
	}

	if enc := cfg.Machine().SystemDiskEncryption().Get(label); !isNilEncryption(enc) {
		return enc
	}

	return nil
}

func isNilEncryption(enc config.EncryptionConfig) bool {
	return volume.SpecFromConfig(enc).Provider == 0 && len(volume.SpecFromConfig(enc).Keys) == 0
}

// setupStateEncryption keeps STATE's encryption settings in META tag 0x09,
// where the next boot reads them before any configuration
// (VolumeConfigController.setupStateEncryption).
func (b *bootRun) setupStateEncryption(cfg talosconfig.Provider) error {
	if cfg.RawV1Alpha1() == nil {
		return nil
	}

	data, err := volume.MarshalMeta(encryptionOf(cfg, constants.StatePartitionLabel))
	if err != nil {
		return fmt.Errorf("error marshaling encryption config for %s: %w", constants.StatePartitionLabel, err)
	}

	if previous, ok := b.m.meta.get(meta.StateEncryptionConfig); ok && bytes.Equal(previous, data) {
		return nil
	}

	if err := b.m.meta.set(meta.StateEncryptionConfig, data); err != nil {
		return err
	}

	b.m.log.Info("saved state encryption config to META", zap.Int("boot", b.num))

	return nil
}

// persist writes cfg to STATE (config.PersistenceController).
func (b *bootRun) persist(cfg talosconfig.Provider) error {
	data, err := cfg.Bytes()
	if err != nil {
		return fmt.Errorf("error getting config bytes: %w", err)
	}

	tmp := filepath.Join(b.state.Data(), ConfigFile+"-tmp")
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return fmt.Errorf("error writing config to file: %w", err)
	}

	if err := os.Rename(tmp, filepath.Join(b.state.Data(), ConfigFile)); err != nil {
		return fmt.Errorf("error renaming config file: %w", err)
	}

	b.mu.Lock()
	b.persisted = cfg
	b.mu.Unlock()

	b.m.log.Info(MsgConfigStored, zap.Int("boot", b.num))

	return nil
}

// roots are the machine's trusted roots now: the built-in bundle and the
// TrustedRootsConfig of the configuration in force
// (secrets.TrustedRootsController, httpdefaults.RootCAs).
func (b *bootRun) roots() *x509.CertPool {
	b.mu.Lock()
	cfg := b.cfg
	b.mu.Unlock()

	return b.m.rootsWith(cfg)
}

func (m *Machine) rootsWith(cfg config.Config) *x509.CertPool {
	pool := x509.NewCertPool()

	if m.cfg.Roots != "" {
		if pem, err := os.ReadFile(m.cfg.Roots); err == nil {
			pool.AppendCertsFromPEM(pem)
		}
	}

	if cfg != nil && cfg.TrustedRoots() != nil {
		for _, c := range cfg.TrustedRoots().ExtraTrustedRootCertificates() {
			pool.AppendCertsFromPEM([]byte(c))
		}
	}

	return pool
}

// installed reports whether Talos is installed on the system disk.
func (m *Machine) installed() bool {
	if !m.cfg.BootMedia {
		return true
	}

	_, err := os.Stat(filepath.Join(m.cfg.Dir, diskDir, bootDir, installedFile))

	return err == nil
}

func (m *Machine) markInstalled() error {
	dir := filepath.Join(m.cfg.Dir, diskDir, bootDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("installing: %w", err)
	}

	if err := os.WriteFile(filepath.Join(dir, installedFile), nil, 0o600); err != nil {
		return fmt.Errorf("installing: %w", err)
	}

	return nil
}

// hostname is the machine's hostname under cfg.
func (b *bootRun) hostname(cfg config.Config) string {
	if cfg != nil && cfg.NetworkHostnameConfig() != nil && cfg.NetworkHostnameConfig().Hostname() != "" {
		return cfg.NetworkHostnameConfig().Hostname()
	}

	return hostnameFor(b.uuid, b.m.cfg.MAC)
}

// updateHostname keeps the hostname resource current.
func (b *bootRun) updateHostname(ctx context.Context, cfg config.Config) {
	hostname := b.hostname(cfg)

	err := safe.StateModify(ctx, b.cosi, network.NewHostnameStatus(network.NamespaceName, network.HostnameID), func(r *network.HostnameStatus) error {
		r.TypedSpec().Hostname = hostname

		return nil
	})
	if err != nil {
		b.m.log.Warn("updating the hostname resource", zap.Error(err))
	}
}

// shutdown stops the extension services, then the API.
func (b *bootRun) shutdown() {
	b.mu.Lock()
	exts := b.exts
	if b.rollback != nil {
		b.rollback.Stop()
	}
	b.mu.Unlock()

	var wg sync.WaitGroup

	for _, e := range exts {
		wg.Go(e.stop)
	}

	wg.Wait()

	if b.svcCancel != nil {
		b.svcCancel()
	}

	b.services.Wait()
}
