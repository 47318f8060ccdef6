// Package runtime composes the agent: the COSI state, the controller runtime
// and the controllers with their dependencies, from the configuration.
package runtime

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/cosi-project/runtime/pkg/controller"
	cosiruntime "github.com/cosi-project/runtime/pkg/controller/runtime"
	"github.com/cosi-project/runtime/pkg/state"
	"github.com/cosi-project/runtime/pkg/state/impl/inmem"
	"github.com/cosi-project/runtime/pkg/state/impl/namespaced"
	"go.uber.org/zap"

	"github.com/sovra-dev/sovra/agent/config"
	bootstrapctrl "github.com/sovra-dev/sovra/agent/controllers/bootstrap"
	discoveryctrl "github.com/sovra-dev/sovra/agent/controllers/discovery"
	"github.com/sovra-dev/sovra/agent/controllers/discovery/cidrscan"
	electionctrl "github.com/sovra-dev/sovra/agent/controllers/election"
	nodectrl "github.com/sovra-dev/sovra/agent/controllers/node"
	"github.com/sovra-dev/sovra/agent/runtime/clock"
	"github.com/sovra-dev/sovra/agent/runtime/talosapi"
)

// TalosAPI is everything the controllers need from the Talos API.
type TalosAPI interface {
	discoveryctrl.Prober
	bootstrapctrl.Talos
	nodectrl.MachineTypeReader
}

// Options are the dependencies of the agent. Only Config and Logger are
// required; the rest default to the production implementations.
type Options struct {
	// Config is the validated configuration.
	Config config.Config
	// Logger receives every log line.
	Logger *zap.Logger
	// Clock defaults to the wall clock.
	Clock clock.Clock
	// Talos defaults to the machinery client with the talosconfig.
	Talos TalosAPI
	// PeerSource defaults to a scan of the network CIDR. With a daemon it is
	// the daemon's membership list (package daemonlink).
	PeerSource discoveryctrl.PeerSource
	// Lease is the daemon's bootstrap lease (package daemonlink). Nil is
	// edge-only mode.
	Lease bootstrapctrl.BootstrapLease
	// LocalAddrs lists this machine's addresses; nil means the interfaces'.
	LocalAddrs func() ([]netip.Addr, error)
	// Controllers are further controllers (attestation, volumes) that run
	// beside the bootstrap ones, on the same state.
	Controllers []controller.Controller
}

// Runtime is the composed agent.
type Runtime struct {
	state   state.State
	runtime *cosiruntime.Runtime
	logger  *zap.Logger
}

// New composes the agent. The bootstrap controllers are registered only when
// the configuration enables the bootstrap path.
func New(opts Options) (*Runtime, error) {
	st := state.WrapCore(namespaced.NewState(inmem.Build))

	rt, err := cosiruntime.NewRuntime(st, opts.Logger)
	if err != nil {
		return nil, fmt.Errorf("creating the controller runtime: %w", err)
	}

	ctrls, err := bootstrapControllers(opts)
	if err != nil {
		return nil, err
	}

	for _, c := range append(ctrls, opts.Controllers...) {
		if err := rt.RegisterController(c); err != nil {
			return nil, fmt.Errorf("registering controller %s: %w", c.Name(), err)
		}
	}

	return &Runtime{state: st, runtime: rt, logger: opts.Logger}, nil
}

// State returns the agent's resource state, for the status command.
func (r *Runtime) State() state.State { return r.state }

// Run runs the controllers until ctx is done or one fails.
func (r *Runtime) Run(ctx context.Context) error {
	if err := r.runtime.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return fmt.Errorf("running the controllers: %w", err)
	}

	return nil
}

func bootstrapControllers(opts Options) ([]controller.Controller, error) {
	cfg, logger := opts.Config, opts.Logger
	b := cfg.Bootstrap

	switch {
	case cfg.DaemonEndpoint != "" && cfg.Role == config.RoleWorker:
		logger.Info("auto-bootstrap not run: this node is a worker (SOVRA_ROLE), and only control planes bootstrap etcd")

		return nil, nil
	case cfg.DaemonEndpoint != "" && (opts.PeerSource == nil || opts.Lease == nil):
		logger.Warn("auto-bootstrap disabled: a daemon is configured, and bootstrapping with a daemon needs its membership " +
			"list and bootstrap lease, which this node has no link to; the Talos control-plane provider bootstraps instead")

		return nil, nil
	case cfg.DaemonEndpoint == "" && !b.Enabled():
		logger.Info("auto-bootstrap disabled: no network CIDR configured")

		return nil, nil
	}

	clk := opts.Clock
	if clk == nil {
		clk = clock.Real{}
	}

	self, err := SelfAddress(cfg, opts.LocalAddrs)
	if err != nil {
		return nil, err
	}

	talos := opts.Talos
	if talos == nil {
		tlsConfig, err := talosapi.LoadTLS(cfg.TalosConfigPath)
		if err != nil {
			return nil, err
		}

		var peerTLS *tls.Config
		if cfg.PeerTalosConfigPath != "" {
			if peerTLS, err = talosapi.LoadTLS(cfg.PeerTalosConfigPath); err != nil {
				return nil, err
			}
		}

		talos = &talosapi.Client{TLS: tlsConfig, PeerTLS: peerTLS, Port: cfg.TalosAPIPort, Timeout: b.APITimeout, Local: self}
	}

	source := opts.PeerSource
	if source == nil {
		source = &cidrscan.Scanner{Prefix: b.NetworkCIDR, Port: cfg.TalosAPIPort, Concurrency: b.ScanConcurrency, Timeout: b.ConnectTimeout}
	}

	if b.ExpectedControlPlanes == 1 {
		logger.Warn("expected control-plane count is 1: this node bootstraps etcd alone as soon as it sees itself")
	}

	cidr := "none: peers from the daemon"
	if b.NetworkCIDR.IsValid() {
		cidr = b.NetworkCIDR.String()
	}

	logger.Info("auto-bootstrap enabled",
		zap.String("network_cidr", cidr), zap.Stringer("self", self),
		zap.Int("expected_control_planes", b.ExpectedControlPlanes), zap.Duration("scan_interval", b.ScanInterval),
		zap.Bool("daemon_peers", opts.PeerSource != nil), zap.Bool("lease", opts.Lease != nil))

	return []controller.Controller{
		&nodectrl.RoleController{Role: cfg.Role, Reader: talos, Clock: clk, RetryInterval: b.PollInterval},
		&discoveryctrl.ScanController{Source: source, Prober: talos, Self: self, Clock: clk, Interval: b.ScanInterval},
		&electionctrl.ElectionController{ExpectedControlPlanes: b.ExpectedControlPlanes},
		&bootstrapctrl.BootstrapController{Talos: talos, Lease: opts.Lease, Clock: clk, PollInterval: b.PollInterval},
	}, nil
}

// SelfAddress returns this node's address in the network CIDR: the configured
// one, else the lowest local address inside the CIDR.
func SelfAddress(cfg config.Config, localAddrs func() ([]netip.Addr, error)) (netip.Addr, error) {
	if cfg.NodeAddress.IsValid() {
		return cfg.NodeAddress, nil
	}

	if localAddrs == nil {
		localAddrs = InterfaceAddrs
	}

	addrs, err := localAddrs()
	if err != nil {
		return netip.Addr{}, fmt.Errorf("listing local addresses: %w", err)
	}

	var best netip.Addr

	for _, a := range addrs {
		if cfg.Bootstrap.NetworkCIDR.Contains(a) && (!best.IsValid() || a.Less(best)) {
			best = a
		}
	}

	if !best.IsValid() {
		return best, fmt.Errorf("finding this node's address: no local address inside the network CIDR %q (set SOVRA_NODE_ADDRESS)", cfg.Bootstrap.NetworkCIDR)
	}

	return best, nil
}

// InterfaceAddrs returns the addresses of the machine's interfaces.
func InterfaceAddrs() ([]netip.Addr, error) {
	ifAddrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, err
	}

	out := make([]netip.Addr, 0, len(ifAddrs))

	for _, a := range ifAddrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			out = append(out, p.Addr().Unmap())
		}
	}

	return out, nil
}
