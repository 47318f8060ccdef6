// Package machineconfig builds the Talos machine configurations sovra gives
// machines, with Talos's own config types and loader (pkg/machinery):
//
//   - the enrollment configuration a machine of the pool boots before it is
//     claimed: a worker of a throwaway cluster generated per request (no
//     secret of any cluster), the agent in host mode, STATE and EPHEMERAL
//     encrypted with sovrad's KMS from the first boot, the daemon's CA as a
//     trusted root, and the Talos API closed to the network;
//   - the configuration released to a claimed machine: its Machine's bootstrap
//     data (the Talos provider's) merged with what sovra needs on the node (the
//     agent's ExtensionServiceConfig, KMS encryption of STATE and EPHEMERAL, the
//     daemon's CA, the kubelet's provider ID, the CA of the agent's local
//     Talos API client).
//
// Every configuration is loaded and validated with Talos's config loader
// before it leaves.
package machineconfig

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/siderolabs/crypto/x509"
	clientconfig "github.com/siderolabs/talos/pkg/machinery/client/config"
	"github.com/siderolabs/talos/pkg/machinery/config"
	coreconfig "github.com/siderolabs/talos/pkg/machinery/config/config"
	"github.com/siderolabs/talos/pkg/machinery/config/configloader"
	"github.com/siderolabs/talos/pkg/machinery/config/container"
	"github.com/siderolabs/talos/pkg/machinery/config/encoder"
	"github.com/siderolabs/talos/pkg/machinery/config/generate"
	"github.com/siderolabs/talos/pkg/machinery/config/generate/secrets"
	"github.com/siderolabs/talos/pkg/machinery/config/machine"
	"github.com/siderolabs/talos/pkg/machinery/config/types/block"
	"github.com/siderolabs/talos/pkg/machinery/config/types/network"
	"github.com/siderolabs/talos/pkg/machinery/config/types/runtime/extensions"
	"github.com/siderolabs/talos/pkg/machinery/config/types/security"
	"github.com/siderolabs/talos/pkg/machinery/config/types/v1alpha1"
	"github.com/siderolabs/talos/pkg/machinery/constants"
	"github.com/siderolabs/talos/pkg/machinery/nethelpers"
	blockres "github.com/siderolabs/talos/pkg/machinery/resources/block"
	"github.com/siderolabs/talos/pkg/machinery/role"
	"go.yaml.in/yaml/v4"
)

// What sovra puts on a machine.
const (
	// AgentService is the extension service of the agent (ext-sovra-agent).
	AgentService = "sovra-agent"
	// DaemonCAPath and TalosconfigPath are where the agent's config files
	// are mounted.
	DaemonCAPath    = "/etc/sovra/daemon-ca.crt"
	TalosconfigPath = "/etc/sovra/talosconfig"
	// PeerTalosconfigPath is where a control plane's agent finds its
	// talosconfig for the other nodes of its cluster.
	PeerTalosconfigPath = "/etc/sovra/peer-talosconfig"
	// TrustedRootsName names the TrustedRootsConfig of the daemon's CA.
	TrustedRootsName = "sovra-daemon-ca"
	// ProviderIDArg is the kubelet argument that names the machine to
	// Cluster API.
	ProviderIDArg = "provider-id"

	// enrollmentCluster names the throwaway cluster of an enrollment
	// configuration; enrollmentEndpoint is where its (non-existent) API
	// would be: the machine never joins anything.
	enrollmentCluster  = "sovra-enrollment"
	enrollmentEndpoint = "https://127.0.0.1:6443"
	// enrollmentKubernetes is the Kubernetes version of the throwaway
	// cluster (never run).
	enrollmentKubernetes = constants.DefaultKubernetesVersion
	// localTalosAPI is where the agent reaches its own machine's Talos API.
	localTalosAPI = "127.0.0.1"
	// agentCertTTL is the lifetime of the agent's local Talos API client
	// certificate.
	agentCertTTL = 10 * 365 * 24 * time.Hour
	// installDiskSize selects the disk Talos installs to from boot media:
	// the first disk of at least this size (Talos's metal platform refuses
	// a configuration from talos.config= without install instructions:
	// v1alpha1_validation.go, RequiresInstall).
	installDiskSize = ">= 8GB"
)

// Environment variables of the agent's configuration (agent/config).
const (
	envDaemonEndpoint = "SOVRA_DAEMON_ENDPOINT"
	envDaemonCA       = "SOVRA_DAEMON_CA"
	envDaemonServer   = "SOVRA_DAEMON_SERVER_NAME"
	envTalosconfig    = "SOVRA_TALOSCONFIG"
	envHost           = "SOVRA_HOST"
	envGeneration     = "SOVRA_HOST_GENERATION"
	envRole           = "SOVRA_ROLE"
	envNodeAddress    = "SOVRA_NODE_ADDRESS"
	envControlPlanes  = "SOVRA_BOOTSTRAP_EXPECTED_CONTROL_PLANES"
	envPeerTalos      = "SOVRA_PEER_TALOSCONFIG"
)

// Roles of a released machine's agent (SOVRA_ROLE).
const (
	RoleControlPlane = "controlplane"
	RoleWorker       = "worker"
)

// Daemon is how a machine reaches sovrad.
type Daemon struct {
	// Endpoint is the node API, host:port; the KMS is on it.
	Endpoint string
	// ServerName, when set, is the name checked in the node API's
	// certificate (default: Endpoint's host).
	ServerName string
	// CA is the PEM of the node CA (node-ca.crt): the agent and Talos verify
	// the node API with it.
	CA []byte
}

// Validate reports every problem of d at once.
func (d Daemon) Validate() error {
	var errs []error
	if _, _, err := net.SplitHostPort(d.Endpoint); err != nil {
		errs = append(errs, fmt.Errorf("daemon endpoint %q: want host:port: %w", d.Endpoint, err))
	}
	if len(d.CA) == 0 {
		errs = append(errs, errors.New("the daemon's CA is required"))
	}
	return errors.Join(errs...)
}

// kmsEndpoint is the KMS URL Talos's VolumeConfig takes.
func (d Daemon) kmsEndpoint() string { return "https://" + d.Endpoint }

// runtimeMode is Talos's validation mode: metal requires install
// instructions (Talos's metal platform validates a configuration from
// talos.config= so); a released configuration is validated as a cloud or
// installed image, where the bootstrap data decides.
type runtimeMode struct{ install bool }

func (runtimeMode) String() string          { return "metal" }
func (m runtimeMode) RequiresInstall() bool { return m.install }
func (runtimeMode) InContainer() bool       { return false }

// Load parses and validates a configuration with Talos's loader, as an
// installed machine reads it.
func Load(data []byte) (config.Provider, error) { return load(data, runtimeMode{}) }

func load(data []byte, mode runtimeMode) (config.Provider, error) {
	cfg, err := configloader.NewFromBytes(data)
	if err != nil {
		return nil, fmt.Errorf("loading the machine configuration: %w", err)
	}
	if _, err := cfg.Validate(mode); err != nil {
		return nil, fmt.Errorf("validating the machine configuration: %w", err)
	}
	return cfg, nil
}

// Enroller makes enrollment configurations. The throwaway cluster's
// Kubernetes and etcd secrets are made once per process (they cost seconds
// and nothing uses them: the machine never joins that cluster); each
// configuration gets its own Talos API CA, so no two machines share a
// Talos identity. It is safe for concurrent use.
type Enroller struct {
	once sync.Once
	base *secrets.Bundle
	err  error
}

// Config returns an enrollment configuration for d: a control-plane node of
// the throwaway cluster that is never bootstrapped (a control-plane node
// issues its own Talos API certificate; a worker would wait for a trustd
// that does not exist), with the agent in host mode, STATE and EPHEMERAL
// encrypted with sovrad's KMS, the daemon's CA trusted, and the Talos API
// closed to the network (the agent reaches it on 127.0.0.1).
func (e *Enroller) Config(d Daemon, now time.Time) ([]byte, error) {
	if err := d.Validate(); err != nil {
		return nil, fmt.Errorf("making the enrollment configuration: %w", err)
	}
	e.once.Do(func() { e.base, e.err = secrets.NewBundle(secrets.NewFixedClock(now), config.TalosVersionCurrent) })
	if e.err != nil {
		return nil, fmt.Errorf("making the enrollment configuration: %w", e.err)
	}
	osCA, err := secrets.NewTalosCA(now)
	if err != nil {
		return nil, fmt.Errorf("making the enrollment configuration: %w", err)
	}
	bundle := *e.base
	certs := *e.base.Certs
	certs.OS = x509.NewCertificateAndKeyFromCertificateAuthority(osCA)
	bundle.Certs = &certs
	bundle.Clock = secrets.NewFixedClock(now)
	in, err := generate.NewInput(enrollmentCluster, enrollmentEndpoint, enrollmentKubernetes,
		generate.WithSecretsBundle(&bundle), generate.WithEndpointList([]string{localTalosAPI}),
		generate.WithRoles(role.MakeSet(role.Admin)))
	if err != nil {
		return nil, fmt.Errorf("making the enrollment configuration: %w", err)
	}
	base, err := in.Config(machine.TypeControlPlane)
	if err != nil {
		return nil, fmt.Errorf("making the enrollment configuration: %w", err)
	}
	if err := selectInstallDisk(base.RawV1Alpha1()); err != nil {
		return nil, fmt.Errorf("making the enrollment configuration: %w", err)
	}
	talosconfig, err := in.Talosconfig()
	if err != nil {
		return nil, fmt.Errorf("making the enrollment configuration: %w", err)
	}
	tc, err := talosconfig.Bytes()
	if err != nil {
		return nil, fmt.Errorf("making the enrollment configuration: %w", err)
	}
	firewall := network.NewDefaultActionConfigV1Alpha1()
	firewall.Ingress = nethelpers.DefaultActionBlock
	docs := append([]coreconfig.Document{base.RawV1Alpha1()}, sovraDocuments(d, tc, nil, nil)...)
	docs = append(docs, firewall)
	return encode(docs, runtimeMode{install: true})
}

// selectInstallDisk gives the enrollment configuration install
// instructions that fit any machine: the first disk of installDiskSize.
func selectInstallDisk(c *v1alpha1.Config) error {
	var size v1alpha1.InstallDiskSizeMatcher
	if err := yaml.Unmarshal([]byte(strconv.Quote(installDiskSize)), &size); err != nil {
		return fmt.Errorf("the install disk selector: %w", err)
	}
	if c.MachineConfig.MachineInstall == nil {
		c.MachineConfig.MachineInstall = &v1alpha1.InstallConfig{}
	}
	c.MachineConfig.MachineInstall.InstallDisk = ""
	c.MachineConfig.MachineInstall.InstallDiskSelector = &v1alpha1.InstallDiskSelector{Size: &size}
	return nil
}

// Released is what Merge adds to a Machine's bootstrap data.
type Released struct {
	Daemon Daemon
	// ProviderID names the machine to Cluster API (sovra://<host>).
	ProviderID string
	// Generation is the generation of the release, which the agent reports
	// back once the machine runs it.
	Generation int64
	// AgentCA signs the agent's client certificate for the machine's own
	// Talos API. Unless AgentReadOnly, the configuration lists it in
	// machine.acceptedCAs, so only this machine accepts that certificate,
	// and the certificate is os:admin.
	AgentCA *x509.PEMEncodedCertificateAndKey
	// AgentReadOnly makes the agent's certificate os:reader, and leaves
	// machine.acceptedCAs as it is: for a worker, whose Talos API accepts
	// only the cluster's Talos CA (Talos's secrets/api.go, generateWorker),
	// so that AgentCA is that CA and a certificate of it is valid on every
	// node of the cluster. os:reader is what the agent's calls need there:
	// COSI Get and List of non-sensitive resources, SystemStat, Memory,
	// Version (Talos's machined.go rules); what needs os:admin on a worker
	// (ApplyConfiguration, Reset) sovrad does with the cluster's
	// talosconfig.
	AgentReadOnly bool
	// Role is the machine's role for its agent (RoleControlPlane or
	// RoleWorker; empty lets the agent ask Talos). A worker's agent stays
	// out of the bootstrap election.
	Role string
	// ExpectedControlPlanes is the control plane's size (the
	// TalosControlPlane's replicas), the quorum of its agents' election;
	// zero leaves the agent's default.
	ExpectedControlPlanes int32
	// NodeAddress is the address the agent announces for the election (one
	// the host enrolled with, the Machine's address); empty lets the agent
	// find it.
	NodeAddress string
}

// env is the agent's environment a release adds.
func (r Released) env() []string {
	var env []string
	if r.Generation > 0 {
		env = append(env, envGeneration+"="+strconv.FormatInt(r.Generation, 10))
	}
	if r.Role != "" {
		env = append(env, envRole+"="+r.Role)
	}
	if r.ExpectedControlPlanes > 0 {
		env = append(env, envControlPlanes+"="+strconv.FormatInt(int64(r.ExpectedControlPlanes), 10))
	}
	if r.NodeAddress != "" {
		env = append(env, envNodeAddress+"="+r.NodeAddress)
	}
	return env
}

// Merge returns the bootstrap data of a Machine (the Talos provider's
// configuration) with what sovra needs on the node, validated.
func Merge(bootstrap []byte, r Released) ([]byte, error) {
	if err := r.Daemon.Validate(); err != nil {
		return nil, fmt.Errorf("merging the machine configuration: %w", err)
	}
	if r.Role != "" && r.Role != RoleControlPlane && r.Role != RoleWorker {
		return nil, fmt.Errorf("merging the machine configuration: role %q: want %s or %s", r.Role, RoleControlPlane, RoleWorker)
	}
	if r.NodeAddress != "" {
		if _, err := netip.ParseAddr(r.NodeAddress); err != nil {
			return nil, fmt.Errorf("merging the machine configuration: node address %q: %w", r.NodeAddress, err)
		}
	}
	cfg, err := configloader.NewFromBytes(bootstrap)
	if err != nil {
		return nil, fmt.Errorf("merging the machine configuration: the bootstrap data does not load: %w", err)
	}
	if cfg.RawV1Alpha1() == nil {
		return nil, errors.New("merging the machine configuration: the bootstrap data has no v1alpha1 machine configuration")
	}
	// apid presents a certificate of the machine's Talos CA: the agent's
	// talosconfig verifies it with that CA, and presents a certificate of
	// the agent CA, which machine.acceptedCAs lets in.
	osCA := cfg.RawV1Alpha1().MachineConfig
	if osCA == nil || osCA.MachineCA == nil || len(osCA.MachineCA.Crt) == 0 {
		return nil, errors.New("merging the machine configuration: the bootstrap data has no Talos CA (machine.ca)")
	}
	roles := role.MakeSet(role.Admin)
	if r.AgentReadOnly {
		roles = role.MakeSet(role.Reader)
	}
	tc, err := agentTalosconfig(r.AgentCA, roles, osCA.MachineCA.Crt)
	if err != nil {
		return nil, err
	}
	patched, err := cfg.PatchV1Alpha1(func(c *v1alpha1.Config) error {
		if c.MachineConfig == nil {
			return errors.New("the bootstrap data has no machine section")
		}
		if c.MachineConfig.MachineKubelet == nil {
			c.MachineConfig.MachineKubelet = &v1alpha1.KubeletConfig{}
		}
		if c.MachineConfig.MachineKubelet.KubeletExtraArgs == nil {
			c.MachineConfig.MachineKubelet.KubeletExtraArgs = v1alpha1.Args{}
		}
		c.MachineConfig.MachineKubelet.KubeletExtraArgs[ProviderIDArg] = v1alpha1.NewArgValue(r.ProviderID, nil)
		if !r.AgentReadOnly {
			c.MachineConfig.MachineAcceptedCAs = append(c.MachineConfig.MachineAcceptedCAs,
				&x509.PEMEncodedCertificate{Crt: r.AgentCA.Crt})
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("merging the machine configuration: %w", err)
	}
	env, files := r.env(), extensions.ConfigFileList(nil)
	if r.Role == RoleControlPlane && !r.AgentReadOnly && len(osCA.MachineCA.Key) > 0 {
		// The election reads the other nodes' Talos APIs, which do not
		// accept the agent CA: an os:reader certificate of the cluster's
		// Talos CA, whose key a control plane's configuration holds anyway.
		peer, err := agentTalosconfig(&x509.PEMEncodedCertificateAndKey{Crt: osCA.MachineCA.Crt, Key: osCA.MachineCA.Key},
			role.MakeSet(role.Reader), osCA.MachineCA.Crt)
		if err != nil {
			return nil, err
		}
		env = append(env, envPeerTalos+"="+PeerTalosconfigPath)
		files = append(files, extensions.ConfigFile{ConfigFileContent: string(peer), ConfigFileMountPath: PeerTalosconfigPath})
	}
	ours := sovraDocuments(r.Daemon, tc, env, files)
	docs := slices.DeleteFunc(slices.Clone(patched.Documents()), func(doc coreconfig.Document) bool {
		return replaces(ours, doc)
	})
	return encode(append(docs, ours...), runtimeMode{})
}

// sovraDocuments are the documents sovra adds: the agent's service
// configuration (with env and files besides what reaches the daemon), KMS encryption of STATE and EPHEMERAL, the daemon's CA.
func sovraDocuments(d Daemon, talosconfig []byte, env []string, files extensions.ConfigFileList) []coreconfig.Document {
	agent := extensions.NewServicesConfigV1Alpha1()
	agent.ServiceName = AgentService
	agent.ServiceEnvironment = []string{
		envDaemonEndpoint + "=" + d.Endpoint,
		envDaemonCA + "=" + DaemonCAPath,
		envTalosconfig + "=" + TalosconfigPath,
		envHost + "=true",
	}
	if d.ServerName != "" {
		agent.ServiceEnvironment = append(agent.ServiceEnvironment, envDaemonServer+"="+d.ServerName)
	}
	agent.ServiceEnvironment = append(agent.ServiceEnvironment, env...)
	agent.ServiceConfigFiles = extensions.ConfigFileList{
		{ConfigFileContent: string(d.CA), ConfigFileMountPath: DaemonCAPath},
		{ConfigFileContent: string(talosconfig), ConfigFileMountPath: TalosconfigPath},
	}
	agent.ServiceConfigFiles = append(agent.ServiceConfigFiles, files...)
	roots := security.NewTrustedRootsConfigV1Alpha1()
	roots.MetaName = TrustedRootsName
	roots.Certificates = string(d.CA)
	return []coreconfig.Document{agent, kmsVolume(constants.StatePartitionLabel, d, false), kmsVolume(constants.EphemeralPartitionLabel, d, true), roots}
}

// kmsVolume encrypts a system volume with sovrad's KMS; EPHEMERAL is locked
// to STATE, so a disk moved to another machine stays closed.
func kmsVolume(name string, d Daemon, lockToState bool) *block.VolumeConfigV1Alpha1 {
	v := block.NewVolumeConfigV1Alpha1()
	v.MetaName = name
	v.EncryptionSpec = block.EncryptionSpec{
		EncryptionProvider: blockres.EncryptionProviderLUKS2,
		EncryptionKeys: []block.EncryptionKey{{
			KeySlot: 0, KeyKMS: &block.EncryptionKeyKMS{KMSEndpoint: d.kmsEndpoint()},
			KeyLockToSTATE: &lockToState,
		}},
	}
	return v
}

// replaces reports whether one of ours takes doc's place: the same kind and
// name (the agent's service, the system volumes, the daemon's CA).
func replaces(ours []coreconfig.Document, doc coreconfig.Document) bool {
	named, ok := doc.(coreconfig.NamedDocument)
	if !ok {
		return false
	}
	for _, o := range ours {
		if on, ok := o.(coreconfig.NamedDocument); ok && o.Kind() == doc.Kind() && on.Name() == named.Name() {
			return true
		}
	}
	return false
}

// agentTalosconfig is the agent's client configuration for its own
// machine's Talos API: a certificate of ca with roles, and the machine's
// Talos CA (serverCA), which signs apid's certificate.
func agentTalosconfig(ca *x509.PEMEncodedCertificateAndKey, roles role.Set, serverCA []byte) ([]byte, error) {
	if ca == nil {
		return nil, errors.New("merging the machine configuration: no agent CA")
	}
	cert, err := secrets.NewAdminCertificateAndKey(time.Now(), ca, roles, agentCertTTL)
	if err != nil {
		return nil, fmt.Errorf("issuing the agent's Talos API certificate: %w", err)
	}
	b, err := clientconfig.NewConfig(AgentService, []string{localTalosAPI}, serverCA, cert).Bytes()
	if err != nil {
		return nil, fmt.Errorf("encoding the agent's talosconfig: %w", err)
	}
	return b, nil
}

// NewAgentCA makes the CA of a machine's agent client certificates.
func NewAgentCA(now time.Time) (*x509.PEMEncodedCertificateAndKey, error) {
	ca, err := secrets.NewTalosCA(now)
	if err != nil {
		return nil, fmt.Errorf("making the agent CA: %w", err)
	}
	return x509.NewCertificateAndKeyFromCertificateAuthority(ca), nil
}

// encode bundles docs and checks the result with Talos's loader in mode.
func encode(docs []coreconfig.Document, mode runtimeMode) ([]byte, error) {
	c, err := container.New(docs...)
	if err != nil {
		return nil, fmt.Errorf("bundling the machine configuration: %w", err)
	}
	b, err := c.EncodeBytes(encoder.WithComments(encoder.CommentsDisabled))
	if err != nil {
		return nil, fmt.Errorf("encoding the machine configuration: %w", err)
	}
	if _, err := load(b, mode); err != nil {
		return nil, err
	}
	return b, nil
}
