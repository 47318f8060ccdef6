// Package config is the agent's configuration: one typed struct, read from
// flags and from the environment that Talos passes to the extension service
// (ExtensionServiceConfig), and validated in one place that reports every
// problem at once. For the edge-only bootstrap of a three-node control plane:
//
//	apiVersion: v1alpha1
//	kind: ExtensionServiceConfig
//	name: sovra-agent
//	configFiles:
//	  - content: <a talosconfig: os:admin client certificate and the Talos CA>
//	    mountPath: /etc/sovra/talosconfig
//	environment:
//	  - SOVRA_BOOTSTRAP_NETWORK_CIDR=10.0.0.0/24
//	  - SOVRA_BOOTSTRAP_EXPECTED_CONTROL_PLANES=3
//
// KOMMODITY_AUTOBOOTSTRAP_NETWORK_CIDR and KOMMODITY_AUTOBOOTSTRAP_QUORUM are
// accepted for the first two; `sovra-agent help` lists every setting.
package config

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"go.uber.org/zap/zapcore"
)

// Defaults. Each one is documented on the field it fills.
const (
	DefaultLogLevel              = "info"
	DefaultTalosConfigPath       = "/etc/sovra/talosconfig"
	DefaultTalosAPIPort          = 50000
	DefaultExpectedControlPlanes = 3
	DefaultScanInterval          = 5 * time.Second
	DefaultScanConcurrency       = 1024
	DefaultConnectTimeout        = 300 * time.Millisecond
	DefaultAPITimeout            = 3 * time.Second
	DefaultPollInterval          = 2 * time.Second
	// DefaultMapPrefix prefixes the device-mapper name of each volume.
	DefaultMapPrefix = "sovra-"
	// DefaultStateDir is the agent's state directory on a Talos node.
	DefaultStateDir = "/var/lib/sovra-agent"
	// DefaultAttestInterval is the time between attestations.
	DefaultAttestInterval = 10 * time.Minute

	// maxIPv4PrefixBits and maxIPv6HostBits bound the scanned range to a /16
	// (65536 addresses) unless the operator overrides it.
	minIPv4PrefixBits  = 16
	minIPv6PrefixBits  = 128 - 16
	maxScanConcurrency = 65536
)

// Role says whether this node takes part in the etcd bootstrap.
type Role string

// Roles.
const (
	// RoleAuto asks the local Talos API for the machine type.
	RoleAuto Role = "auto"
	// RoleControlPlane takes part in discovery, election and bootstrap.
	RoleControlPlane Role = "controlplane"
	// RoleWorker leaves the bootstrap path at once.
	RoleWorker Role = "worker"
)

// Config is everything the agent reads at start.
type Config struct {
	// LogLevel is a zap level name (debug, info, warn, error). Default info.
	LogLevel string
	// Role is auto (default), controlplane or worker.
	Role Role
	// NodeAddress is this node's address inside the network CIDR. The zero
	// value means: the lowest local interface address inside the CIDR.
	NodeAddress netip.Addr
	// TalosConfigPath is the talosconfig the agent uses for the Talos API: a
	// client certificate from the cluster's Talos CA, and that CA, which
	// every peer's certificate must chain to. Default /etc/sovra/talosconfig.
	TalosConfigPath string

	// PeerTalosConfigPath, when set, is the talosconfig for the Talos API
	// of every other node (a provisioned control plane's own talosconfig is
	// accepted by that node alone); empty uses TalosConfigPath.
	PeerTalosConfigPath string
	// TalosAPIPort is the port of Talos apid on every node. Default 50000.
	TalosAPIPort int
	// StateDir is where the agent writes its status document (status.json,
	// read with `talosctl read`). Default /var/lib/sovra-agent.
	StateDir string
	// DaemonEndpoint is the sovra daemon's node API (host:port). Empty means
	// edge-only mode: peers come from the CIDR scan and there is no lease.
	DaemonEndpoint string
	// Bootstrap configures discovery, election and the etcd bootstrap.
	Bootstrap Bootstrap
	// Attestation configures enrollment and attestation with the daemon; it
	// runs when DaemonEndpoint is set.
	Attestation Attestation
	// Volumes configures the data volumes the agent encrypts itself.
	Volumes Volumes
	// Host configures host mode, on a machine of sovra's pool.
	Host Host
}

// Host configures host mode: the machine is one of sovra's pool of hosts.
// The agent reports the machine's hardware to the daemon's host service and
// applies what it answers (a machine configuration, or a reset) through the
// local Talos API. sovrad sets both in the agent configurations it serves.
type Host struct {
	// Enabled turns host mode on. It needs the daemon endpoint and a
	// talosconfig for the local Talos API. Off by default.
	Enabled bool
	// Generation is the generation of the machine configuration the
	// machine runs, as sovrad released it; zero means the machine runs the
	// enrollment configuration.
	Generation int64
}

// Volumes configures agent-managed LUKS2 volumes: their keys come from the
// daemon after this boot's attestation and live only in memory.
type Volumes struct {
	// Devices maps a volume ID (its name to the daemon) to its raw
	// partition. Empty: the agent manages no volume.
	Devices map[string]string
	// KeyEndpoint is the daemon's key service (host:port); empty means the
	// daemon endpoint, where sovrad serves it by default.
	KeyEndpoint string
	// MapPrefix opens each volume at /dev/mapper/<prefix><id>. Empty only
	// checks that the volume takes its key. Default "sovra-".
	MapPrefix string
}

// Attestation configures how the agent proves its boot to the daemon.
type Attestation struct {
	// DaemonCA is the daemon's node-ca.crt, which verifies the node API.
	// Required with DaemonEndpoint.
	DaemonCA string
	// DaemonServerName overrides the name checked in the daemon's
	// certificate; empty means the endpoint's host.
	DaemonServerName string
	// TPM selects the TPM: device (default: /dev/tpmrm0, else /dev/tpm0),
	// device:PATH, or swtpm:HOST:PORT (labs and tests).
	TPM string
	// Interval is the time between attestations. Default 10m.
	Interval time.Duration
	// NodeUUID is the SMBIOS UUID Talos sends with KMS calls; empty means
	// read from /sys/class/dmi/id/product_uuid.
	NodeUUID string
	// EventLog is the TPM event log; empty means the kernel's securityfs file.
	EventLog string
}

// Bootstrap configures the zero-touch etcd bootstrap.
type Bootstrap struct {
	// NetworkCIDR is the private range scanned for Talos apid. The zero
	// value disables the scan (and so the bootstrap in edge-only mode).
	NetworkCIDR netip.Prefix
	// ExpectedControlPlanes is the number of control-plane nodes of the
	// cluster, and the quorum: a leader is elected only when exactly this
	// many verified control-plane nodes are seen. Default 3.
	ExpectedControlPlanes int
	// AllowUnsafeCIDR lets a public range, or one larger than a /16, be
	// scanned. Off by default; set it only after a security review.
	AllowUnsafeCIDR bool
	// ScanInterval is the time between discovery rounds. Default 5s.
	ScanInterval time.Duration
	// ScanConcurrency is the number of addresses probed at once. Default 1024.
	ScanConcurrency int
	// ConnectTimeout bounds the TCP connect to one address. Default 300ms.
	ConnectTimeout time.Duration
	// APITimeout bounds the Talos API calls to one verified peer. Default 3s.
	APITimeout time.Duration
	// PollInterval is how often a follower checks etcd on the leader.
	// Default 2s.
	PollInterval time.Duration
}

// Enabled reports whether this configuration asks for the bootstrap path.
func (b Bootstrap) Enabled() bool { return b.NetworkCIDR.IsValid() }

// Default returns the configuration with every default filled in.
func Default() Config {
	return Config{
		LogLevel:        DefaultLogLevel,
		Role:            RoleAuto,
		TalosConfigPath: DefaultTalosConfigPath,
		TalosAPIPort:    DefaultTalosAPIPort,
		StateDir:        DefaultStateDir,
		Attestation:     Attestation{Interval: DefaultAttestInterval},
		Bootstrap: Bootstrap{
			ExpectedControlPlanes: DefaultExpectedControlPlanes,
			ScanInterval:          DefaultScanInterval,
			ScanConcurrency:       DefaultScanConcurrency,
			ConnectTimeout:        DefaultConnectTimeout,
			APITimeout:            DefaultAPITimeout,
			PollInterval:          DefaultPollInterval,
		},
	}
}

// setting is one configuration value: a flag, its environment variables
// (the first is ours, the rest are accepted aliases), and how to apply it.
type setting struct {
	flag  string
	envs  []string
	usage string
	apply func(c *Config, v string) error
	// show prints the setting's value in c, for the usage text.
	show func(c Config) string
}

func settings() []setting {
	return []setting{
		{"log-level", []string{"SOVRA_LOG_LEVEL"}, "log level: debug, info, warn, error", func(c *Config, v string) error {
			c.LogLevel = v

			return nil
		}, func(c Config) string { return c.LogLevel }},
		{"role", []string{"SOVRA_ROLE"}, "auto (ask Talos), controlplane or worker", func(c *Config, v string) error {
			c.Role = Role(strings.ToLower(v))

			return nil
		}, func(c Config) string { return string(c.Role) }},
		{"node-address", []string{"SOVRA_NODE_ADDRESS"}, "this node's address in the network CIDR (default: detected)", func(c *Config, v string) error {
			a, err := netip.ParseAddr(v)
			c.NodeAddress = a

			return err
		}, func(Config) string { return "" }},
		{"talosconfig", []string{"SOVRA_TALOSCONFIG"}, "talosconfig with the client certificate and the cluster's Talos CA", func(c *Config, v string) error {
			c.TalosConfigPath = v

			return nil
		}, func(c Config) string { return c.TalosConfigPath }},
		{"peer-talosconfig", []string{"SOVRA_PEER_TALOSCONFIG"}, "talosconfig for the other nodes' Talos API (default: the talosconfig)", func(c *Config, v string) error {
			c.PeerTalosConfigPath = v

			return nil
		}, func(c Config) string { return c.PeerTalosConfigPath }},
		{"talos-api-port", []string{"SOVRA_TALOS_API_PORT"}, "port of Talos apid", func(c *Config, v string) error {
			return parseInt(v, &c.TalosAPIPort)
		}, func(c Config) string { return strconv.Itoa(c.TalosAPIPort) }},
		{"daemon-endpoint", []string{"SOVRA_DAEMON_ENDPOINT"}, "sovra daemon node API (empty: edge-only mode)", func(c *Config, v string) error {
			c.DaemonEndpoint = v

			return nil
		}, func(Config) string { return "" }},
		{"state-dir", []string{"SOVRA_STATE_DIR"}, "directory of the status document (status.json)", func(c *Config, v string) error {
			c.StateDir = v

			return nil
		}, func(c Config) string { return c.StateDir }},
		{"daemon-ca", []string{"SOVRA_DAEMON_CA"}, "the daemon's node-ca.crt, which verifies the node API", func(c *Config, v string) error {
			c.Attestation.DaemonCA = v

			return nil
		}, func(Config) string { return "" }},
		{"daemon-server-name", []string{"SOVRA_DAEMON_SERVER_NAME"}, "name checked in the daemon's certificate (default: the endpoint's host)", func(c *Config, v string) error {
			c.Attestation.DaemonServerName = v

			return nil
		}, func(Config) string { return "" }},
		{"tpm", []string{"SOVRA_TPM"}, "TPM: device, device:PATH or swtpm:HOST:PORT", func(c *Config, v string) error {
			c.Attestation.TPM = v

			return nil
		}, func(Config) string { return "device" }},
		{"attest-interval", []string{"SOVRA_ATTEST_INTERVAL"}, "time between attestations", func(c *Config, v string) error {
			return parseDuration(v, &c.Attestation.Interval)
		}, func(c Config) string { return c.Attestation.Interval.String() }},
		{"node-uuid", []string{"SOVRA_NODE_UUID"}, "SMBIOS UUID of this node (default: read from sysfs)", func(c *Config, v string) error {
			c.Attestation.NodeUUID = v

			return nil
		}, func(Config) string { return "" }},
		{"event-log", []string{"SOVRA_EVENT_LOG"}, "TPM event log (default: securityfs binary_bios_measurements)", func(c *Config, v string) error {
			c.Attestation.EventLog = v

			return nil
		}, func(Config) string { return "" }},
		{"volumes", []string{"SOVRA_VOLUMES"}, "agent-managed volumes as ID=DEVICE, comma-separated (keys from the daemon)", func(c *Config, v string) error {
			return parseVolumes(v, c)
		}, func(Config) string { return "" }},
		{"key-endpoint", []string{"SOVRA_KEY_ENDPOINT"}, "daemon key service host:port (default: the daemon endpoint)", func(c *Config, v string) error {
			c.Volumes.KeyEndpoint = v

			return nil
		}, func(Config) string { return "" }},
		{"volume-map-prefix", []string{"SOVRA_VOLUME_MAP_PREFIX"}, "open volumes at /dev/mapper/<prefix><id>; empty only checks the key", func(c *Config, v string) error {
			c.Volumes.MapPrefix = v

			return nil
		}, func(c Config) string { return c.Volumes.MapPrefix }},
		{"host", []string{"SOVRA_HOST"}, "host mode: report to the daemon's host service, apply the configuration it releases", func(c *Config, v string) error {
			b, err := strconv.ParseBool(v)
			c.Host.Enabled = b

			return err
		}, func(c Config) string { return strconv.FormatBool(c.Host.Enabled) }},
		{"host-generation", []string{"SOVRA_HOST_GENERATION"}, "generation of the configuration this host runs (0: the enrollment configuration)", func(c *Config, v string) error {
			n, err := strconv.ParseInt(v, 10, 64)
			c.Host.Generation = n

			return err
		}, func(Config) string { return "" }},
		{"network-cidr", []string{"SOVRA_BOOTSTRAP_NETWORK_CIDR", "KOMMODITY_AUTOBOOTSTRAP_NETWORK_CIDR"}, "private range scanned for Talos peers (empty: no bootstrap)", func(c *Config, v string) error {
			p, err := netip.ParsePrefix(v)
			c.Bootstrap.NetworkCIDR = p.Masked()

			return err
		}, func(Config) string { return "" }},
		{"expected-control-planes", []string{"SOVRA_BOOTSTRAP_EXPECTED_CONTROL_PLANES", "KOMMODITY_AUTOBOOTSTRAP_QUORUM"}, "control-plane nodes of the cluster, and the quorum", func(c *Config, v string) error {
			return parseInt(v, &c.Bootstrap.ExpectedControlPlanes)
		}, func(c Config) string { return strconv.Itoa(c.Bootstrap.ExpectedControlPlanes) }},
		{"allow-unsafe-cidr", []string{"SOVRA_BOOTSTRAP_ALLOW_UNSAFE_CIDR"}, "allow a public network CIDR or one larger than /16", func(c *Config, v string) error {
			b, err := strconv.ParseBool(v)
			c.Bootstrap.AllowUnsafeCIDR = b

			return err
		}, func(c Config) string { return strconv.FormatBool(c.Bootstrap.AllowUnsafeCIDR) }},
		{"scan-interval", []string{"SOVRA_BOOTSTRAP_SCAN_INTERVAL"}, "time between discovery rounds", func(c *Config, v string) error {
			return parseDuration(v, &c.Bootstrap.ScanInterval)
		}, func(c Config) string { return c.Bootstrap.ScanInterval.String() }},
		{"scan-concurrency", []string{"SOVRA_BOOTSTRAP_SCAN_CONCURRENCY"}, "addresses probed at once", func(c *Config, v string) error {
			return parseInt(v, &c.Bootstrap.ScanConcurrency)
		}, func(c Config) string { return strconv.Itoa(c.Bootstrap.ScanConcurrency) }},
		{"connect-timeout", []string{"SOVRA_BOOTSTRAP_CONNECT_TIMEOUT"}, "TCP connect timeout per address", func(c *Config, v string) error {
			return parseDuration(v, &c.Bootstrap.ConnectTimeout)
		}, func(c Config) string { return c.Bootstrap.ConnectTimeout.String() }},
		{"api-timeout", []string{"SOVRA_BOOTSTRAP_API_TIMEOUT"}, "Talos API timeout per verified peer", func(c *Config, v string) error {
			return parseDuration(v, &c.Bootstrap.APITimeout)
		}, func(c Config) string { return c.Bootstrap.APITimeout.String() }},
		{"poll-interval", []string{"SOVRA_BOOTSTRAP_POLL_INTERVAL"}, "how often a follower checks etcd on the leader", func(c *Config, v string) error {
			return parseDuration(v, &c.Bootstrap.PollInterval)
		}, func(c Config) string { return c.Bootstrap.PollInterval.String() }},
	}
}

// Load reads the configuration from args (flags, without the program name)
// and from getenv (os.LookupEnv in production). A flag wins over its
// environment variable. Load returns every problem it finds, joined, and a
// valid Config only when there is none.
func Load(args []string, getenv func(string) (string, bool)) (Config, error) {
	cfg := Default()
	all := settings()

	fs := pflag.NewFlagSet("sovra-agent run", pflag.ContinueOnError)
	fs.SetOutput(devNull{})

	values := make([]*string, len(all))
	for i, s := range all {
		values[i] = fs.String(s.flag, "", s.usage+" (env "+strings.Join(s.envs, ", ")+")")
	}

	if err := fs.Parse(args); err != nil {
		return cfg, fmt.Errorf("parsing flags: %w", err)
	}

	var problems []error

	for i, s := range all {
		v, source, err := lookup(fs, s, *values[i], getenv)
		if err != nil {
			problems = append(problems, err)

			continue
		}

		if source == "" {
			continue
		}

		if err := s.apply(&cfg, strings.TrimSpace(v)); err != nil {
			problems = append(problems, fmt.Errorf("%s: invalid value: %w", source, err))
		}
	}

	if len(problems) > 0 {
		return cfg, errors.Join(problems...)
	}

	return cfg, cfg.Validate()
}

// Usage returns the flag help of the run command.
func Usage() string {
	var b strings.Builder

	def := Default()

	for _, s := range settings() {
		line := fmt.Sprintf("  --%-26s %s (env %s", s.flag, s.usage, strings.Join(s.envs, ", "))
		if v := s.show(def); v != "" {
			line += "; default " + v
		}

		fmt.Fprintln(&b, line+")")
	}

	return b.String()
}

// lookup finds the value of one setting and names where it came from; an
// empty source means unset. Two aliases set to different values are an error.
func lookup(fs *pflag.FlagSet, s setting, flagValue string, getenv func(string) (string, bool)) (string, string, error) {
	if fs.Changed(s.flag) {
		return flagValue, "--" + s.flag, nil
	}

	var value, source string

	for _, env := range s.envs {
		v, ok := getenv(env)
		if !ok || strings.TrimSpace(v) == "" {
			continue
		}

		if source != "" && strings.TrimSpace(v) != strings.TrimSpace(value) {
			return "", "", fmt.Errorf("%s and %s are both set, to different values: set one", source, env)
		}

		if source == "" {
			value, source = v, env
		}
	}

	return value, source, nil
}

// Validate checks the whole configuration and reports every problem at once.
func (c Config) Validate() error {
	var problems []error

	add := func(format string, args ...any) { problems = append(problems, fmt.Errorf(format, args...)) }

	if _, err := zapcore.ParseLevel(c.LogLevel); err != nil {
		add("log level %q: want debug, info, warn or error", c.LogLevel)
	}

	switch c.Role {
	case RoleAuto, RoleControlPlane, RoleWorker:
	default:
		add("role %q: want auto, controlplane or worker", c.Role)
	}

	if c.TalosAPIPort < 1 || c.TalosAPIPort > 65535 {
		add("talos API port %d: want 1-65535", c.TalosAPIPort)
	}

	if c.DaemonEndpoint != "" {
		if _, _, err := net.SplitHostPort(c.DaemonEndpoint); err != nil {
			add("daemon endpoint %q: want host:port", c.DaemonEndpoint)
		}

		if c.Attestation.DaemonCA == "" {
			add("daemon endpoint set without --daemon-ca: the agent must verify the daemon")
		}
	}

	if len(c.Volumes.Devices) > 0 && c.DaemonEndpoint == "" {
		add("volumes need a daemon endpoint: their keys are released only after attestation")
	}

	problems = append(problems, c.Host.validate(c)...)

	if c.PeerTalosConfigPath != "" {
		if _, err := os.Stat(c.PeerTalosConfigPath); err != nil {
			add("peer talosconfig %s: %w", c.PeerTalosConfigPath, errors.Unwrap(err))
		}
	}

	if c.Attestation.Interval < time.Minute {
		add("attest interval %s: want at least 1m", c.Attestation.Interval)
	}

	b := c.Bootstrap

	if b.ExpectedControlPlanes < 1 {
		add("expected control planes %d: want at least 1 (it is also the quorum)", b.ExpectedControlPlanes)
	}

	if b.ScanInterval <= 0 {
		add("scan interval %s: want more than 0", b.ScanInterval)
	}

	if b.ScanConcurrency < 1 || b.ScanConcurrency > maxScanConcurrency {
		add("scan concurrency %d: want 1-%d", b.ScanConcurrency, maxScanConcurrency)
	}

	if b.ConnectTimeout <= 0 || b.APITimeout <= 0 || b.PollInterval <= 0 {
		add("timeouts and poll interval must be more than 0")
	}

	if b.Enabled() {
		problems = append(problems, checkCIDR(b.NetworkCIDR, b.AllowUnsafeCIDR)...)

		if c.NodeAddress.IsValid() && !b.NetworkCIDR.Contains(c.NodeAddress) {
			add("node address %s is not inside the network CIDR %s", c.NodeAddress, b.NetworkCIDR)
		}

		if c.TalosConfigPath == "" {
			add("talosconfig: a path is required for the bootstrap (SOVRA_TALOSCONFIG)")
		} else if _, err := os.Stat(c.TalosConfigPath); err != nil {
			add("talosconfig %s: %w", c.TalosConfigPath, errors.Unwrap(err))
		}
	}

	return errors.Join(problems...)
}

// validate checks host mode: it needs the daemon (the host service and the
// node credential) and the local Talos API.
func (h Host) validate(c Config) []error {
	var problems []error

	if h.Generation < 0 {
		problems = append(problems, fmt.Errorf("host generation %d: want 0 (the enrollment configuration) or more", h.Generation))
	}

	if !h.Enabled {
		if h.Generation > 0 {
			problems = append(problems, errors.New("host generation set without host mode (SOVRA_HOST=true)"))
		}

		return problems
	}

	if c.DaemonEndpoint == "" {
		problems = append(problems, errors.New("host mode needs the daemon endpoint (SOVRA_DAEMON_ENDPOINT)"))
	}

	switch {
	case c.TalosConfigPath == "":
		problems = append(problems, errors.New("host mode needs a talosconfig for the local Talos API (SOVRA_TALOSCONFIG)"))
	default:
		if _, err := os.Stat(c.TalosConfigPath); err != nil {
			problems = append(problems, fmt.Errorf("host mode: talosconfig %s: %w", c.TalosConfigPath, errors.Unwrap(err)))
		}
	}

	return problems
}

// checkCIDR refuses a range that is public or larger than a /16 unless the
// override is set.
func checkCIDR(p netip.Prefix, allowUnsafe bool) []error {
	if allowUnsafe {
		return nil
	}

	var problems []error

	const override = "set SOVRA_BOOTSTRAP_ALLOW_UNSAFE_CIDR=true only after a security review"

	if !p.Addr().IsPrivate() || !lastAddr(p).IsPrivate() {
		problems = append(problems, fmt.Errorf(
			"network CIDR %s is not a private range: auto-bootstrap scans only RFC 1918 / RFC 4193 networks (%s)", p, override))
	}

	minBits := minIPv4PrefixBits
	if p.Addr().Is6() {
		minBits = minIPv6PrefixBits
	}

	if p.Bits() < minBits {
		problems = append(problems, fmt.Errorf(
			"network CIDR %s is larger than 65536 addresses (/%d): narrow it to the control-plane subnet (%s)", p, minBits, override))
	}

	return problems
}

// lastAddr returns the highest address in p.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 1 << (7 - uint(i%8))
	}

	a, _ := netip.AddrFromSlice(b)

	return a
}

func parseInt(v string, out *int) error {
	n, err := strconv.Atoi(v)
	if err != nil {
		return err
	}

	*out = n

	return nil
}

func parseDuration(v string, out *time.Duration) error {
	d, err := time.ParseDuration(v)
	if err != nil {
		return err
	}

	*out = d

	return nil
}

type devNull struct{}

func (devNull) Write(p []byte) (int, error) { return len(p), nil }

// parseVolumes reads "id=device,id2=device2" into c.Volumes.Devices.
func parseVolumes(v string, c *Config) error {
	devices := map[string]string{}

	for _, item := range strings.Split(v, ",") {
		id, dev, ok := strings.Cut(strings.TrimSpace(item), "=")
		if !ok || id == "" || dev == "" {
			return fmt.Errorf("%q: want ID=DEVICE", item)
		}

		if _, dup := devices[id]; dup {
			return fmt.Errorf("volume %q given twice", id)
		}

		devices[id] = dev
	}

	c.Volumes.Devices = devices

	return nil
}

// KeyEndpoint returns the daemon's key service address.
func (c Config) KeyEndpoint() string {
	if c.Volumes.KeyEndpoint != "" {
		return c.Volumes.KeyEndpoint
	}

	return c.DaemonEndpoint
}
