// Package config is the typed configuration of sovrad: its flags, the SOVRA_*
// environment variables that set the same values, the defaults, and the
// validation that runs once at start and reports every problem together.
package config

import (
	"errors"
	"fmt"
	"math"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"golang.org/x/sys/unix"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/sovra-dev/sovra/daemon/auditpolicy"
	"github.com/sovra-dev/sovra/daemon/capi/controllers"
	"github.com/sovra-dev/sovra/daemon/capi/fence"
)

const (
	// EnvPrefix prefixes the environment variable of every flag: --data-dir is SOVRA_DATA_DIR.
	EnvPrefix = "SOVRA_"

	defaultDataDir         = "/var/lib/sovra"
	defaultListen          = "127.0.0.1:6443"
	defaultShutdownTimeout = 30 * time.Second
	defaultUsernameClaim   = "sub"
	defaultNodeListen      = ":7443"
	defaultNodeCertTTL     = time.Hour
	defaultNonceTTL        = time.Minute
	defaultNodeRatePerIP   = 10
	// defaultNodeMaxConnsPerIP bounds the connections one source holds on
	// the node API and KMS listeners: Talos opens one per KMS call, an agent
	// one or two; a NAT in front of many nodes needs more.
	defaultNodeMaxConnsPerIP = 32
	// defaultNodeMaxConns bounds the connections held on them in total,
	// well under the unit's LimitNOFILE (65536) so the API server and the
	// datastore keep their file descriptors.
	defaultNodeMaxConns   = 4096
	defaultAttestDeadline = 10 * time.Minute
	defaultSealWindow     = time.Hour
	// defaultConfigAttestationAge and defaultMaxPending are the host pool's
	// (packages hosts and kms).
	defaultConfigAttestationAge = 15 * time.Minute
	defaultMaxPending           = 256
	// maxConfigAttestationAge bounds --config-attestation-max-age.
	maxConfigAttestationAge = 24 * time.Hour
	defaultKMSRatePerIP     = 5
	// maxSealWindow bounds --seal-window: a window is a time in which
	// anyone who knows a new node's UUID may Seal.
	maxSealWindow = 24 * time.Hour

	// maxUnixSocketPath is the longest path a unix socket can have on Linux
	// (sun_path is 108 bytes with the terminating NUL).
	maxUnixSocketPath = 107
)

// Datastore kinds, chosen by the scheme of --datastore.
const (
	DatastoreSQLite   = "sqlite"
	DatastorePostgres = "postgres"
)

// Config is everything sovrad is told at start. The zero value is not useful:
// build one with New and Parse, then call Validate.
type Config struct {
	// DataDir holds the daemon's state: its PKI, keys, kubeconfig, audit log and,
	// on the default datastore, the SQLite database. Created with mode 0700.
	DataDir string
	// Datastore is the datastore URL: empty for SQLite in DataDir, or
	// postgres://user:pass@host/db for several replicas on one database.
	// It may hold a password: never log it or put it in an error.
	Datastore string
	// Listen is the address of the Kubernetes API (HTTPS).
	Listen string
	// AdvertiseAddress is the address clients reach the API on; empty means the
	// listen address when it is specific, else the first non-loopback address.
	AdvertiseAddress string
	// TLSSANs are extra DNS names and IPs for the API's serving certificate.
	TLSSANs []string

	// KMS is the Talos KMS (key custody); off when MasterKeyFile is empty.
	KMS KMS

	// NodeAPI is the API nodes call: enrollment and attestation.
	NodeAPI NodeAPI

	// Hosts is sovra's pool of machines: the boot server and the delivery
	// of machine configurations.
	Hosts Hosts

	// OIDC authenticates people with an OpenID Connect provider; off when IssuerURL is empty.
	OIDC OIDC
	// AdminGroup, when set, is bound to cluster-admin (for OIDC or certificate groups).
	AdminGroup string

	// AuditLog is the audit log file; "-" writes it to stdout. Empty means
	// audit.log in DataDir.
	AuditLog string
	// AuditPolicy is an audit policy file that replaces the default policy.
	// It must record SovraNodes at Metadata at most (package auditpolicy).
	AuditPolicy string

	// LogLevel is the level of sovrad's own logs: debug, info, warn or error.
	LogLevel string
	// ShutdownTimeout bounds a graceful shutdown; past it the process exits.
	ShutdownTimeout time.Duration

	// Controllers selects the in-process controllers (Cluster API, the Talos
	// providers, the garbage collector): "all" (the default), "none" to serve
	// the API only, or names; see package daemon/capi/controllers.
	Controllers string
	// BootstrapGrace is how long the Talos control-plane provider waits for
	// the agents of a cluster with labelled SovraNodes to win its bootstrap
	// lease before it takes the lease itself (package daemon/capi/fence).
	BootstrapGrace time.Duration
}

// OIDC configures OpenID Connect authentication of the Kubernetes API.
type OIDC struct {
	IssuerURL     string
	ClientID      string
	UsernameClaim string
	GroupsClaim   string
	// CAFile verifies the issuer's TLS certificate; empty means the system roots.
	CAFile string
}

// NodeAPI configures the node API (gRPC over TLS) and who may enroll.
type NodeAPI struct {
	// Listen is the node API's TLS address; empty turns it off.
	Listen string
	// EKRoots and EKIntermediates are PEM bundles of TPM manufacturer CAs
	// that an EK certificate must chain to.
	EKRoots, EKIntermediates string
	// EKAllowList is a file of hex SHA-256 EK public-key hashes, one a line.
	EKAllowList string
	// EKTrustOnFirstUse admits any EK. Labs only: it proves nothing.
	EKTrustOnFirstUse bool
	// NodeCertTTL is the lifetime of the node credential a passing
	// attestation earns; NonceTTL how long an attestation nonce is accepted.
	NodeCertTTL, NonceTTL time.Duration
	// RatePerIP bounds enrollment, nonce and attestation calls per peer
	// address, in calls a second; zero turns the limit off.
	RatePerIP float64
	// MaxConnsPerIP bounds the connections held at a time from one source
	// (an IPv4 address, an IPv6 /64) on the node API and KMS listeners;
	// --kms-trusted-proxies are exempt. Zero means no bound.
	MaxConnsPerIP int
	// MaxConns bounds the connections held on those listeners together;
	// zero means no bound.
	MaxConns int
}

// Hosts configures sovra's pool of machines (packages hosts, bootconfig).
type Hosts struct {
	// BootListen is the HTTPS address of the boot server, which serves the
	// enrollment configuration; empty turns it off.
	BootListen string
	// NodeEndpoint is the host:port machines reach the node API (and the
	// KMS on it) at; empty means the advertise address and the node API's
	// port.
	NodeEndpoint string
	// AutoAccept accepts a new host whose EK was admitted by a certificate
	// or the allow-list and whose attestation passed an AttestationPolicy.
	AutoAccept bool
	// MaxAttestationAge bounds the age of the attestation a machine's
	// configuration is released on.
	MaxAttestationAge time.Duration
	// MaxPending bounds the machines that fetched the enrollment
	// configuration and have not enrolled yet.
	MaxPending int
}

// KMS configures the Talos KMS: sidero.kms.KMSService over TLS.
type KMS struct {
	// MasterKeyFile is the master keyring (mode 0600, outside the
	// datastore; the same file on every replica). Empty turns the KMS off;
	// a missing file is created with a fresh key on first start.
	MasterKeyFile string
	// Listen is the KMS's TLS address.
	Listen string
	// LabMode lets any node Seal (its record is created on first Seal and
	// must enroll within AttestDeadline).
	LabMode bool
	// AttestDeadline is how long a key release waits for the node to report
	// the boot that explains it before it is an unexpected release.
	AttestDeadline time.Duration
	// SealWindow is how long after its creation (pre-registration or
	// enrollment) a record may Seal.
	SealWindow time.Duration
	// QuarantineUnexpected quarantines a node on an unexpected release.
	QuarantineUnexpected bool
	// RatePerIP bounds the KMS calls of one source address, in calls a
	// second (burst: four seconds of it).
	RatePerIP float64
	// BindAddresses refuses calls from addresses the node's record does not list.
	BindAddresses bool
	// TrustedProxies are CIDRs or IPs whose X-Forwarded-For is believed.
	TrustedProxies []string
}

// New returns the configuration with every default filled in.
func New() *Config {
	return &Config{
		DataDir: defaultDataDir,
		Listen:  defaultListen,
		OIDC:    OIDC{UsernameClaim: defaultUsernameClaim},
		NodeAPI: NodeAPI{Listen: defaultNodeListen, NodeCertTTL: defaultNodeCertTTL, NonceTTL: defaultNonceTTL, RatePerIP: defaultNodeRatePerIP,
			MaxConnsPerIP: defaultNodeMaxConnsPerIP, MaxConns: defaultNodeMaxConns},
		Hosts:           Hosts{MaxAttestationAge: defaultConfigAttestationAge, MaxPending: defaultMaxPending},
		KMS:             KMS{AttestDeadline: defaultAttestDeadline, SealWindow: defaultSealWindow, RatePerIP: defaultKMSRatePerIP},
		LogLevel:        "info",
		ShutdownTimeout: defaultShutdownTimeout,
		Controllers:     controllers.All,
		BootstrapGrace:  fence.DefaultGrace,
	}
}

// FlagSet binds the configuration's fields to flags.
func (c *Config) FlagSet() *pflag.FlagSet {
	fs := pflag.NewFlagSet("sovrad", pflag.ContinueOnError)
	fs.StringVar(&c.DataDir, "data-dir", c.DataDir, "directory for the daemon's keys, certificates, kubeconfig and SQLite database (created 0700)")
	fs.StringVar(&c.Datastore, "datastore", c.Datastore, "datastore URL: empty for SQLite in the data directory, postgres://... for HA replicas on one database")
	fs.StringVar(&c.Listen, "listen", c.Listen, "address of the Kubernetes API (HTTPS); 0.0.0.0:6443 to listen on every interface")
	fs.StringVar(&c.AdvertiseAddress, "advertise-address", c.AdvertiseAddress, "IP address clients reach the API on (added to the serving certificate)")
	fs.StringSliceVar(&c.TLSSANs, "tls-san", c.TLSSANs, "extra DNS names or IPs for the API's serving certificate (repeat or comma-separate)")
	fs.StringVar(&c.OIDC.IssuerURL, "oidc-issuer-url", c.OIDC.IssuerURL, "OpenID Connect issuer (https); enables OIDC authentication")
	fs.StringVar(&c.OIDC.ClientID, "oidc-client-id", c.OIDC.ClientID, "OpenID Connect client ID: the audience tokens must carry")
	fs.StringVar(&c.OIDC.UsernameClaim, "oidc-username-claim", c.OIDC.UsernameClaim, "token claim used as the user name")
	fs.StringVar(&c.OIDC.GroupsClaim, "oidc-groups-claim", c.OIDC.GroupsClaim, "token claim holding the user's groups")
	fs.StringVar(&c.OIDC.CAFile, "oidc-ca-file", c.OIDC.CAFile, "CA bundle that verifies the issuer (default: system roots)")
	fs.StringVar(&c.NodeAPI.Listen, "node-listen", c.NodeAPI.Listen, "TLS address of the node API (enrollment, attestation); empty turns it off")
	fs.StringVar(&c.NodeAPI.EKRoots, "ek-roots", c.NodeAPI.EKRoots, "PEM bundle of TPM manufacturer root CAs an EK certificate must chain to")
	fs.StringVar(&c.NodeAPI.EKIntermediates, "ek-intermediates", c.NodeAPI.EKIntermediates, "PEM bundle of TPM manufacturer intermediate CAs")
	fs.StringVar(&c.NodeAPI.EKAllowList, "ek-allow-list", c.NodeAPI.EKAllowList, "file of allowed EK public-key SHA-256 hashes (hex), one a line")
	fs.BoolVar(&c.NodeAPI.EKTrustOnFirstUse, "ek-trust-on-first-use", c.NodeAPI.EKTrustOnFirstUse, "labs only: let any TPM enroll without checking its EK")
	fs.DurationVar(&c.NodeAPI.NodeCertTTL, "node-cert-ttl", c.NodeAPI.NodeCertTTL, "lifetime of the node credential a passing attestation earns")
	fs.DurationVar(&c.NodeAPI.NonceTTL, "nonce-ttl", c.NodeAPI.NonceTTL, "how long an attestation nonce is accepted")
	fs.Float64Var(&c.NodeAPI.RatePerIP, "node-rate-per-ip", c.NodeAPI.RatePerIP, "enrollment, nonce and attestation calls a second each peer address may make (burst: 5 s of it, at least 10); raise it for nodes behind one NAT; 0 turns the limit off")
	fs.IntVar(&c.NodeAPI.MaxConnsPerIP, "node-max-conns-per-ip", c.NodeAPI.MaxConnsPerIP, "connections one source (an IPv4 address, an IPv6 /64) may hold at a time on the node API and KMS listeners; more are closed at once; --kms-trusted-proxies are exempt; raise it for nodes behind one NAT, 0 turns it off")
	fs.IntVar(&c.NodeAPI.MaxConns, "node-max-conns", c.NodeAPI.MaxConns, "connections the node API and KMS listeners may hold at a time together; more are closed at once; 0 turns it off")
	fs.StringVar(&c.KMS.MasterKeyFile, "master-key-file", c.KMS.MasterKeyFile, "master keyring of the Talos KMS (mode 0600, outside the datastore, the same on every replica; created when missing); empty turns the KMS off")
	fs.StringVar(&c.KMS.Listen, "kms-listen", c.KMS.Listen, "TLS address of the Talos KMS (sidero.kms.KMSService) and the volume key service; empty serves them on the node API (--node-listen)")
	fs.BoolVar(&c.KMS.LabMode, "kms-lab-mode", c.KMS.LabMode, "labs only: let any node Seal; its record is created on first Seal and must enroll within --attest-deadline")
	fs.DurationVar(&c.KMS.AttestDeadline, "attest-deadline", c.KMS.AttestDeadline, "how long a key release waits for the node to report (attest) the boot that explains it before it raises UnexpectedUnseal")
	fs.DurationVar(&c.KMS.SealWindow, "seal-window", c.KMS.SealWindow, "how long after its creation (pre-registration or enrollment) a node's record may Seal; later Seals need a window an operator opens (annotation kms.sovra.dev/sealing-window)")
	fs.BoolVar(&c.KMS.QuarantineUnexpected, "kms-quarantine-unexpected", c.KMS.QuarantineUnexpected, "strict sites: quarantine a node whose key was released unexpectedly (default: an alarm, the node still boots)")
	fs.Float64Var(&c.KMS.RatePerIP, "kms-rate-per-ip", c.KMS.RatePerIP, "KMS calls a second each source address may make (burst: 4 s of it); raise it for nodes behind one NAT")
	fs.BoolVar(&c.KMS.BindAddresses, "kms-bind-addresses", c.KMS.BindAddresses, "refuse KMS calls from addresses the node's record does not list")
	fs.StringSliceVar(&c.KMS.TrustedProxies, "kms-trusted-proxies", c.KMS.TrustedProxies, "CIDRs or IPs of proxies whose X-Forwarded-For the KMS believes (repeat or comma-separate)")
	fs.StringVar(&c.Hosts.BootListen, "boot-listen", c.Hosts.BootListen, "HTTPS address of the boot server, which serves the enrollment configuration of new machines (talos.config=); empty turns it off")
	fs.StringVar(&c.Hosts.NodeEndpoint, "node-endpoint", c.Hosts.NodeEndpoint, "host:port machines reach the node API and its KMS at (default: the advertise address and the --node-listen port)")
	fs.BoolVar(&c.Hosts.AutoAccept, "hosts-auto-accept", c.Hosts.AutoAccept, "accept a new host whose EK a certificate or the allow-list admitted and whose attestation passed an AttestationPolicy")
	fs.DurationVar(&c.Hosts.MaxAttestationAge, "config-attestation-max-age", c.Hosts.MaxAttestationAge, "age of the passing attestation a machine's configuration may be released on")
	fs.IntVar(&c.Hosts.MaxPending, "boot-max-pending", c.Hosts.MaxPending, "machines that fetched the enrollment configuration and did not enroll yet (each may seal its first volumes); more are served the configuration only")
	fs.StringVar(&c.AdminGroup, "admin-group", c.AdminGroup, "group bound to cluster-admin")
	fs.StringVar(&c.AuditLog, "audit-log", c.AuditLog, "audit log file, or - for stdout (default: audit.log in the data directory)")
	fs.StringVar(&c.AuditPolicy, "audit-policy", c.AuditPolicy, "audit policy file replacing the default policy")
	fs.StringVar(&c.LogLevel, "log-level", c.LogLevel, "log level: debug, info, warn or error")
	fs.DurationVar(&c.ShutdownTimeout, "shutdown-timeout", c.ShutdownTimeout, "longest graceful shutdown before the process exits")
	fs.StringVar(&c.Controllers, "controllers", c.Controllers, "controllers to run: all, none (serve the API only), or a comma-separated list of "+strings.Join(controllers.Names, ", ")+"; -name excludes one")
	fs.DurationVar(&c.BootstrapGrace, "bootstrap-grace", c.BootstrapGrace, "how long the Talos control-plane provider waits for the agents of a cluster with labelled SovraNodes to win its bootstrap lease before it bootstraps the cluster itself")
	return fs
}

// Parse sets the configuration from args and, for every flag not given on the
// command line, from its SOVRA_* environment variable. getenv is os.Getenv in
// production. It returns every bad value at once.
func (c *Config) Parse(args []string, getenv func(string) string) error {
	fs := c.FlagSet()
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q: sovrad takes flags only", fs.Args())
	}
	var errs []error
	fs.VisitAll(func(f *pflag.Flag) {
		if f.Changed {
			return
		}
		name := EnvName(f.Name)
		v := getenv(name)
		if v == "" {
			return
		}
		if err := fs.Set(f.Name, v); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", name, err))
		}
	})
	return errors.Join(errs...)
}

// EnvName is the environment variable that sets a flag.
func EnvName(flag string) string {
	return EnvPrefix + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// Validate checks the configuration without changing anything on disk and
// returns every problem found, joined.
func (c *Config) Validate() error {
	var errs []error
	add := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }

	if _, _, err := c.ListenHostPort(); err != nil {
		add("--listen %q: %v", c.Listen, err)
	}
	if c.AdvertiseAddress != "" && net.ParseIP(c.AdvertiseAddress) == nil {
		add("--advertise-address %q: not an IP address", c.AdvertiseAddress)
	}
	for _, san := range c.TLSSANs {
		if net.ParseIP(san) == nil && len(validation.IsDNS1123Subdomain(strings.TrimPrefix(san, "*."))) > 0 {
			add("--tls-san %q: neither an IP address nor a DNS name", san)
		}
	}
	if _, err := c.DatastoreKind(); err != nil {
		errs = append(errs, err)
	}
	errs = append(errs, c.validateDataDir()...)
	errs = append(errs, c.validateOIDC()...)
	errs = append(errs, c.validateNodeAPI()...)
	errs = append(errs, c.validateConnLimits()...)
	errs = append(errs, c.validateKMS()...)
	errs = append(errs, c.validateHosts()...)
	if c.AuditPolicy != "" {
		if err := readable(c.AuditPolicy); err != nil {
			add("--audit-policy: %v", err)
		} else if err := auditpolicy.Check(c.AuditPolicy); err != nil {
			add("--audit-policy %s: %v", c.AuditPolicy, err)
		}
	}
	if c.AuditLog != "" && c.AuditLog != "-" {
		if err := writableDir(filepath.Dir(c.AuditLog)); err != nil {
			add("--audit-log %s: %v", c.AuditLog, err)
		}
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		add("--log-level %q: use debug, info, warn or error", c.LogLevel)
	}
	if c.ShutdownTimeout <= 0 {
		add("--shutdown-timeout %s: must be positive", c.ShutdownTimeout)
	}
	if _, err := controllers.Parse(c.Controllers); err != nil {
		add("--controllers: %v", err)
	}
	if c.BootstrapGrace <= 0 {
		add("--bootstrap-grace %s: must be positive", c.BootstrapGrace)
	}
	return errors.Join(errs...)
}

func (c *Config) validateNodeAPI() []error {
	n := c.NodeAPI
	var errs []error
	if n.Listen == "" {
		return nil
	}
	if _, _, err := net.SplitHostPort(n.Listen); err != nil {
		errs = append(errs, fmt.Errorf("--node-listen %q: want host:port: %v", n.Listen, err))
	}
	for flag, path := range map[string]string{"--ek-roots": n.EKRoots, "--ek-intermediates": n.EKIntermediates, "--ek-allow-list": n.EKAllowList} {
		if path != "" {
			if err := readable(path); err != nil {
				errs = append(errs, fmt.Errorf("%s: %v", flag, err))
			}
		}
	}
	if n.EKIntermediates != "" && n.EKRoots == "" {
		errs = append(errs, errors.New("--ek-intermediates needs --ek-roots"))
	}
	if n.NodeCertTTL < time.Minute || n.NodeCertTTL > 24*time.Hour {
		errs = append(errs, fmt.Errorf("--node-cert-ttl %s: must be between 1m and 24h", n.NodeCertTTL))
	}
	if n.NonceTTL < time.Second || n.NonceTTL > 10*time.Minute {
		errs = append(errs, fmt.Errorf("--nonce-ttl %s: must be between 1s and 10m", n.NonceTTL))
	}
	if n.RatePerIP < 0 || math.IsNaN(n.RatePerIP) || math.IsInf(n.RatePerIP, 0) {
		errs = append(errs, fmt.Errorf("--node-rate-per-ip %v: must be 0 (no limit) or a positive number of calls a second", n.RatePerIP))
	}
	return errs
}

// validateConnLimits checks the connection caps, which bound the node API's
// listener and the KMS's (--kms-listen) alike.
func (c *Config) validateConnLimits() []error {
	n := c.NodeAPI
	var errs []error
	if n.MaxConnsPerIP < 0 {
		errs = append(errs, fmt.Errorf("--node-max-conns-per-ip %d: must be 0 (no limit) or a positive number of connections", n.MaxConnsPerIP))
	}
	if n.MaxConns < 0 {
		errs = append(errs, fmt.Errorf("--node-max-conns %d: must be 0 (no limit) or a positive number of connections", n.MaxConns))
	}
	if n.MaxConns > 0 && n.MaxConnsPerIP > n.MaxConns {
		errs = append(errs, fmt.Errorf("--node-max-conns-per-ip %d: must not exceed --node-max-conns %d", n.MaxConnsPerIP, n.MaxConns))
	}
	return errs
}

func (c *Config) validateHosts() []error {
	h := c.Hosts
	var errs []error
	if h.BootListen != "" {
		if _, _, err := net.SplitHostPort(h.BootListen); err != nil {
			errs = append(errs, fmt.Errorf("--boot-listen %q: want host:port: %v", h.BootListen, err))
		}
		if c.NodeAPI.Listen == "" {
			errs = append(errs, errors.New("--boot-listen: machines enroll on the node API: set --node-listen"))
		}
	}
	if h.NodeEndpoint != "" {
		if host, port, err := net.SplitHostPort(h.NodeEndpoint); err != nil || host == "" || port == "" {
			errs = append(errs, fmt.Errorf("--node-endpoint %q: want host:port", h.NodeEndpoint))
		}
	}
	if h.MaxAttestationAge < time.Minute || h.MaxAttestationAge > maxConfigAttestationAge {
		errs = append(errs, fmt.Errorf("--config-attestation-max-age %s: must be between 1m and %s", h.MaxAttestationAge, maxConfigAttestationAge))
	}
	if h.MaxPending < 1 {
		errs = append(errs, fmt.Errorf("--boot-max-pending %d: must be at least 1", h.MaxPending))
	}
	return errs
}

func (c *Config) validateKMS() []error {
	k := c.KMS
	var errs []error
	if k.MasterKeyFile == "" {
		if k.LabMode || k.BindAddresses || len(k.TrustedProxies) > 0 {
			errs = append(errs, errors.New("--kms-lab-mode, --kms-bind-addresses and --kms-trusted-proxies need --master-key-file (the KMS is off without it)"))
		}
		return errs
	}
	abs, err := filepath.Abs(k.MasterKeyFile)
	if err != nil {
		abs = k.MasterKeyFile
	}
	if db := filepath.Join(c.absDataDir(), "db"); abs == db || strings.HasPrefix(abs, db+string(filepath.Separator)) {
		errs = append(errs, fmt.Errorf("--master-key-file %s: must be outside the datastore directory %s", k.MasterKeyFile, db))
	}
	fi, err := os.Stat(k.MasterKeyFile)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if err := writableDir(filepath.Dir(abs)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("--master-key-file %s: cannot be created: %v", k.MasterKeyFile, err))
		}
	case err != nil:
		errs = append(errs, fmt.Errorf("--master-key-file %s: %v", k.MasterKeyFile, err))
	case !fi.Mode().IsRegular():
		errs = append(errs, fmt.Errorf("--master-key-file %s: not a regular file", k.MasterKeyFile))
	case fi.Mode().Perm() != 0o600:
		errs = append(errs, fmt.Errorf("--master-key-file %s: mode %#o, must be 0600: run chmod 0600 on it", k.MasterKeyFile, fi.Mode().Perm()))
	}
	if k.Listen == "" && c.NodeAPI.Listen == "" {
		errs = append(errs, errors.New("--master-key-file: the KMS is served on the node API or on --kms-listen: set one of them"))
	} else if _, _, err := net.SplitHostPort(k.Listen); k.Listen != "" && err != nil {
		errs = append(errs, fmt.Errorf("--kms-listen %q: want host:port: %v", k.Listen, err))
	}
	if k.AttestDeadline <= 0 {
		errs = append(errs, fmt.Errorf("--attest-deadline %s: must be positive", k.AttestDeadline))
	}
	if k.SealWindow <= 0 || k.SealWindow > maxSealWindow {
		errs = append(errs, fmt.Errorf("--seal-window %s: must be positive and at most %s", k.SealWindow, maxSealWindow))
	}
	if k.RatePerIP <= 0 || math.IsNaN(k.RatePerIP) || math.IsInf(k.RatePerIP, 0) {
		errs = append(errs, fmt.Errorf("--kms-rate-per-ip %v: must be a positive number of calls a second", k.RatePerIP))
	}
	for _, p := range k.TrustedProxies {
		if _, _, err := net.ParseCIDR(p); err != nil && net.ParseIP(p) == nil {
			errs = append(errs, fmt.Errorf("--kms-trusted-proxies %q: neither a CIDR nor an IP address", p))
		}
	}
	return errs
}

// ListenHostPort splits Listen into an IP and a port.
func (c *Config) ListenHostPort() (net.IP, int, error) {
	host, portStr, err := net.SplitHostPort(c.Listen)
	if err != nil {
		return nil, 0, fmt.Errorf("want IP:port: %w", err)
	}
	ip := net.ParseIP(host)
	if ip == nil {
		return nil, 0, fmt.Errorf("%q is not an IP address", host)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 1 || port > 65535 {
		return nil, 0, fmt.Errorf("port %q is not in 1-65535", portStr)
	}
	return ip, port, nil
}

// DatastoreKind returns DatastoreSQLite or DatastorePostgres. Its errors name
// the scheme at most: the URL may hold a password.
func (c *Config) DatastoreKind() (string, error) {
	if c.Datastore == "" {
		return DatastoreSQLite, nil
	}
	u, err := url.Parse(c.Datastore)
	if err != nil || u.Scheme == "" {
		return "", errors.New("--datastore: not a URL: use postgres://user:password@host:5432/database, or leave it empty for SQLite in the data directory")
	}
	switch u.Scheme {
	case "postgres", "postgresql":
		if u.Host == "" {
			return "", errors.New("--datastore: the postgres URL has no host: use postgres://user:password@host:5432/database")
		}
		return DatastorePostgres, nil
	case "sqlite":
		return "", errors.New("--datastore: SQLite is the default and lives in the data directory: leave --datastore empty")
	default:
		return "", fmt.Errorf("--datastore: unsupported scheme %q: use postgres://..., or leave it empty for SQLite", u.Scheme)
	}
}

// KineSocket is the unix socket the embedded etcd API (kine) listens on.
func (c *Config) KineSocket() string {
	return filepath.Join(c.absDataDir(), "kine.sock")
}

func (c *Config) absDataDir() string {
	abs, err := filepath.Abs(c.DataDir)
	if err != nil {
		return c.DataDir
	}
	return abs
}

func (c *Config) validateDataDir() []error {
	if c.DataDir == "" {
		return []error{errors.New("--data-dir: must not be empty")}
	}
	if len(c.KineSocket()) > maxUnixSocketPath {
		return []error{fmt.Errorf("--data-dir %s: path too long for the datastore socket (%d bytes at most): choose a shorter path", c.DataDir, maxUnixSocketPath-len("/kine.sock"))}
	}
	fi, err := os.Stat(c.DataDir)
	switch {
	case errors.Is(err, os.ErrNotExist), errors.Is(err, unix.ENOTDIR):
		parent := filepath.Dir(c.absDataDir())
		if err := writableDir(parent); err != nil {
			return []error{fmt.Errorf("--data-dir %s: cannot be created: %v", c.DataDir, err)}
		}
		return nil
	case err != nil:
		return []error{fmt.Errorf("--data-dir %s: %v", c.DataDir, err)}
	case !fi.IsDir():
		return []error{fmt.Errorf("--data-dir %s: not a directory", c.DataDir)}
	}
	var errs []error
	if err := writableDir(c.DataDir); err != nil {
		errs = append(errs, fmt.Errorf("--data-dir %s: %v", c.DataDir, err))
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		errs = append(errs, fmt.Errorf("--data-dir %s: mode %04o lets other users in; it holds private keys: chmod 700 %s", c.DataDir, perm, c.DataDir))
	}
	for _, name := range SecretFiles {
		p := filepath.Join(c.DataDir, name)
		fi, err := os.Stat(p)
		if err != nil {
			continue
		}
		if perm := fi.Mode().Perm(); perm&0o077 != 0 {
			errs = append(errs, fmt.Errorf("key file %s: mode %04o is readable by other users: chmod 600 %s (and consider the key exposed)", p, perm, p))
		}
	}
	return errs
}

// SecretFiles are the files in the data directory that hold private keys or
// credentials; each must be readable by its owner only.
var SecretFiles = []string{
	"ca.key", "apiserver.key", "sa.key", "admin.key", "admin.kubeconfig", "encryption-config.yaml",
	"node-ca.key", "node-api.key",
	"webhook.key", // the Cluster API webhooks' serving key (daemon/capi/webhooks)
}

func (c *Config) validateOIDC() []error {
	o := c.OIDC
	if o.IssuerURL == "" {
		if o.ClientID != "" || o.GroupsClaim != "" || o.CAFile != "" {
			return []error{errors.New("--oidc-client-id, --oidc-groups-claim and --oidc-ca-file need --oidc-issuer-url")}
		}
		return nil
	}
	var errs []error
	u, err := url.Parse(o.IssuerURL)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		errs = append(errs, fmt.Errorf("--oidc-issuer-url %q: must be an https URL", o.IssuerURL))
	}
	if o.ClientID == "" {
		errs = append(errs, errors.New("--oidc-client-id: required with --oidc-issuer-url"))
	}
	if o.UsernameClaim == "" {
		errs = append(errs, errors.New("--oidc-username-claim: must not be empty"))
	}
	if o.CAFile != "" {
		if err := readable(o.CAFile); err != nil {
			errs = append(errs, fmt.Errorf("--oidc-ca-file: %v", err))
		}
	}
	return errs
}

func readable(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	return f.Close()
}

func writableDir(dir string) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory", dir)
	}
	if err := unix.Access(dir, unix.W_OK|unix.X_OK); err != nil {
		return fmt.Errorf("%s is not writable", dir)
	}
	return nil
}
