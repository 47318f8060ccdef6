package runtime_test

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/cosi-project/runtime/pkg/safe"
	"go.uber.org/zap/zaptest"

	"github.com/sovra-dev/sovra/agent/config"
	"github.com/sovra-dev/sovra/agent/resources/bootstrap"
	"github.com/sovra-dev/sovra/agent/resources/discovery"
	agentruntime "github.com/sovra-dev/sovra/agent/runtime"
)

// fakeCluster is an in-memory set of Talos nodes shared by several agents.
type fakeCluster struct {
	mu    sync.Mutex // guards the maps
	boot  map[netip.Addr]int64
	etcd  map[netip.Addr]bool
	calls map[netip.Addr]int
}

func (c *fakeCluster) addrs() []netip.Addr {
	c.mu.Lock()
	defer c.mu.Unlock()

	var out []netip.Addr
	for a := range c.boot {
		out = append(out, a)
	}

	return out
}

// nodeAPI is one agent's view of the cluster's Talos API.
type nodeAPI struct {
	c    *fakeCluster
	self netip.Addr
}

func (n nodeAPI) Peers(context.Context) ([]netip.Addr, error) { return n.c.addrs(), nil }

func (n nodeAPI) Probe(_ context.Context, addr netip.Addr) (discovery.PeerSpec, error) {
	n.c.mu.Lock()
	defer n.c.mu.Unlock()

	boot, ok := n.c.boot[addr]
	if !ok {
		return discovery.PeerSpec{}, fmt.Errorf("no node at %s", addr)
	}

	spec := discovery.PeerSpec{ControlPlane: true, MachineType: "controlplane", BootTime: boot, EtcdData: n.c.etcd[addr], TimeSynced: true}
	if spec.EtcdData {
		spec.EtcdMembers = 1
	}

	return spec, nil
}

func (n nodeAPI) Bootstrap(_ context.Context, addr netip.Addr) error {
	n.c.mu.Lock()
	defer n.c.mu.Unlock()

	n.c.calls[addr]++
	n.c.etcd[addr] = true

	return nil
}

func (n nodeAPI) EtcdMembers(_ context.Context, addr netip.Addr) (int, error) {
	n.c.mu.Lock()
	defer n.c.mu.Unlock()

	if n.c.etcd[addr] {
		return 1, nil
	}

	return 0, nil
}

func (n nodeAPI) MachineType(context.Context) (string, error) { return "controlplane", nil }

func agentConfig(self netip.Addr) config.Config {
	cfg := config.Default()
	cfg.Bootstrap.NetworkCIDR = netip.MustParsePrefix("10.0.0.0/24")
	cfg.NodeAddress = self
	cfg.Bootstrap.ScanInterval = 20 * time.Millisecond
	cfg.Bootstrap.PollInterval = 10 * time.Millisecond

	return cfg
}

func TestThreeAgentsBootstrapOnce(t *testing.T) {
	c := &fakeCluster{boot: map[netip.Addr]int64{}, etcd: map[netip.Addr]bool{}, calls: map[netip.Addr]int{}}
	addrs := []netip.Addr{netip.MustParseAddr("10.0.0.3"), netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")}

	for i, a := range addrs {
		c.boot[a] = 1000 + int64(i%2) // 10.0.0.3 and 10.0.0.2 tie; 10.0.0.1 boots later
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	var (
		wg  sync.WaitGroup
		rts []*agentruntime.Runtime
	)

	for _, a := range addrs {
		api := nodeAPI{c: c, self: a}

		rt, err := agentruntime.New(agentruntime.Options{
			Config: agentConfig(a), Logger: zaptest.NewLogger(t).Named(a.String()), Talos: api, PeerSource: api,
		})
		if err != nil {
			t.Fatal(err)
		}

		rts = append(rts, rt)

		wg.Add(1)

		go func() {
			defer wg.Done()

			if err := rt.Run(ctx); err != nil {
				t.Error(err)
			}
		}()
	}

	deadline := time.Now().Add(10 * time.Second)

	for _, rt := range rts {
		for {
			st, err := safe.StateGetByID[*bootstrap.Status](ctx, rt.State(), bootstrap.StatusID)
			if err == nil && st.TypedSpec().Phase.Final() {
				break
			}

			if time.Now().After(deadline) {
				t.Fatalf("an agent did not finish: %v", err)
			}

			time.Sleep(5 * time.Millisecond)
		}
	}

	cancel()
	wg.Wait()

	c.mu.Lock()
	defer c.mu.Unlock()

	if len(c.calls) != 1 || c.calls[netip.MustParseAddr("10.0.0.2")] != 1 {
		t.Fatalf("bootstrap calls %v, want one on 10.0.0.2 (earliest boot, lowest address of the tie)", c.calls)
	}
}

func TestBootstrapPathDisabled(t *testing.T) {
	for name, cfg := range map[string]config.Config{
		"no CIDR": config.Default(),
		"daemon without lease": func() config.Config {
			cfg := agentConfig(netip.MustParseAddr("10.0.0.1"))
			cfg.DaemonEndpoint = "sovrad.example:7443"

			return cfg
		}(),
	} {
		t.Run(name, func(t *testing.T) {
			rt, err := agentruntime.New(agentruntime.Options{Config: cfg, Logger: zaptest.NewLogger(t)})
			if err != nil {
				t.Fatal(err)
			}

			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			defer cancel()

			if err := rt.Run(ctx); err != nil {
				t.Fatal(err)
			}

			if _, err := safe.StateGetByID[*bootstrap.Status](context.Background(), rt.State(), bootstrap.StatusID); err == nil {
				t.Fatal("bootstrap controllers ran")
			}
		})
	}
}

func TestSelfAddress(t *testing.T) {
	cfg := agentConfig(netip.Addr{})

	got, err := agentruntime.SelfAddress(cfg, func() ([]netip.Addr, error) {
		return []netip.Addr{netip.MustParseAddr("192.168.1.5"), netip.MustParseAddr("10.0.0.9"), netip.MustParseAddr("10.0.0.7")}, nil
	})
	if err != nil || got != netip.MustParseAddr("10.0.0.7") {
		t.Fatalf("self = %s, %v", got, err)
	}

	if _, err := agentruntime.SelfAddress(cfg, func() ([]netip.Addr, error) { return nil, nil }); err == nil {
		t.Fatal("no error without a local address in the CIDR")
	}
}
