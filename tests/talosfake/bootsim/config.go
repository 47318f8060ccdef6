package bootsim

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"go.uber.org/zap"
)

// Defaults of Config.
const (
	// DefaultAPIPort is apid's port.
	DefaultAPIPort = 50000
	// DefaultTrustdPort is trustd's port.
	DefaultTrustdPort = 50001
	// DefaultVolumeRetry is the volume manager's retry ticker.
	DefaultVolumeRetry = 30 * time.Second
	// DefaultStopTimeout is how long a service has to exit after SIGTERM
	// before it is killed (runner.GracefulShutdownTimeout).
	DefaultStopTimeout = 10 * time.Second
	// DefaultRestartInterval is how long Talos waits before it restarts an
	// extension service that exited (restart.RestartInterval).
	DefaultRestartInterval = 5 * time.Second
	// DefaultLockdown is the kernel lockdown Talos boots with.
	DefaultLockdown = "none [integrity] confidentiality"
)

// Extension is an extension service installed on the machine: its spec
// (what Talos reads from /usr/local/etc/containers/<name>.yaml) and its
// root filesystem (/usr/local/lib/containers/<name>).
type Extension struct {
	// Spec is the service spec file.
	Spec string
	// Rootfs is the root filesystem directory, or a binary that is the
	// root filesystem's only file, at the spec's entrypoint.
	Rootfs string
}

// Config describes one simulated machine. Zero values of optional fields
// are Talos's defaults.
type Config struct {
	// Dir holds the machine's disks (STATE, EPHEMERAL, META), its
	// per-boot files and logs, and status.json.
	Dir string
	// UUID is the SMBIOS system UUID (META tag 0x0f overrides it, as in
	// Talos). Required.
	UUID string
	// Serial is the SMBIOS serial number (${serial}).
	Serial string
	// MAC is the first link's hardware address (${mac}).
	MAC net.HardwareAddr
	// Address is the machine's address on its network, with its prefix.
	// The Talos API listens on it and on 127.0.0.1.
	Address netip.Prefix
	// APIPort and TrustdPort default to 50000 and 50001.
	APIPort, TrustdPort int
	// ConfigURL is the talos.config= kernel argument; empty or "none":
	// no platform configuration.
	ConfigURL string
	// EmbeddedConfig is a configuration file embedded in the boot media;
	// it comes before ConfigURL when it is complete for boot.
	EmbeddedConfig string
	// Roots is a PEM bundle standing for Talos's built-in trusted roots
	// (/etc/ssl/certs/ca-certificates.crt); the TrustedRootsConfig
	// documents of the configuration in force are added to it.
	Roots string
	// Environment are the talos.environment= kernel arguments (KEY=VALUE):
	// the environment of every service, proxies included.
	Environment []string
	// BootMedia boots the machine from installation media (ISO, PXE)
	// until it is installed: the first boot with a configuration installs
	// Talos and reboots. False boots a disk image that is installed.
	BootMedia bool
	// Hardware is what `talosctl get cpus|memorymodules|disks` shows.
	Hardware Hardware
	// EventLog is a TPM event log file, shown at securityfs
	// tpm0/binary_bios_measurements.
	EventLog string
	// Lockdown is securityfs lockdown's content; empty is DefaultLockdown.
	Lockdown string
	// SecureBoot is "enabled", "disabled" or empty (no EFI variable).
	SecureBoot string
	// Devices are device paths the machine has (/dev/tpmrm0): they exist
	// (as empty files) for extension dependencies and mounts; services
	// reach the real devices through their environment.
	Devices []string
	// Extensions are the extension services installed.
	Extensions []Extension
	// Self is the binary that runs containers (it calls container.Main
	// first); empty means this process's executable.
	Self string
	// VolumeRetry, StopTimeout and RestartInterval default to Talos's.
	VolumeRetry, StopTimeout, RestartInterval time.Duration
	// DownloadTimeout and DownloadAttemptTimeout default to Talos's 3 h
	// and 3 min.
	DownloadTimeout, DownloadAttemptTimeout time.Duration
	// Logger gets one line per step; nil means none.
	Logger *zap.Logger
}

// validate checks the configuration, reporting every problem at once, and
// fills in the defaults.
func (c *Config) validate() error {
	var errs []error

	if c.Dir == "" {
		errs = append(errs, errors.New("a state directory is required"))
	}

	if c.UUID == "" {
		errs = append(errs, errors.New("a machine UUID is required"))
	}

	if c.Address.IsValid() && !c.Address.Addr().Is4() && !c.Address.Addr().Is6() {
		errs = append(errs, fmt.Errorf("address %s is not IPv4 or IPv6", c.Address))
	}

	for _, f := range []struct{ name, path string }{{"embedded config", c.EmbeddedConfig}, {"roots", c.Roots}, {"event log", c.EventLog}} {
		if f.path == "" {
			continue
		}

		if _, err := os.Stat(f.path); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", f.name, err))
		}
	}

	for _, e := range c.Environment {
		if !strings.Contains(e, "=") {
			errs = append(errs, fmt.Errorf("environment %q is not KEY=VALUE", e))
		}
	}

	for _, ext := range c.Extensions {
		for _, p := range []string{ext.Spec, ext.Rootfs} {
			if _, err := os.Stat(p); err != nil {
				errs = append(errs, fmt.Errorf("extension: %w", err))
			}
		}
	}

	for _, d := range c.Devices {
		if !filepath.IsAbs(d) {
			errs = append(errs, fmt.Errorf("device %q is not an absolute path", d))
		}
	}

	switch c.SecureBoot {
	case "", "enabled", "disabled":
	default:
		errs = append(errs, fmt.Errorf("secure boot %q is not enabled, disabled or empty", c.SecureBoot))
	}

	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("configuring the machine: %w", err)
	}

	if c.APIPort == 0 {
		c.APIPort = DefaultAPIPort
	}

	if c.TrustdPort == 0 {
		c.TrustdPort = DefaultTrustdPort
	}

	if c.VolumeRetry == 0 {
		c.VolumeRetry = DefaultVolumeRetry
	}

	if c.StopTimeout == 0 {
		c.StopTimeout = DefaultStopTimeout
	}

	if c.RestartInterval == 0 {
		c.RestartInterval = DefaultRestartInterval
	}

	if c.Lockdown == "" {
		c.Lockdown = DefaultLockdown
	}

	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}

	if c.Self == "" {
		self, err := os.Executable()
		if err != nil {
			return fmt.Errorf("configuring the machine: finding this executable: %w", err)
		}

		c.Self = self
	}

	return nil
}
