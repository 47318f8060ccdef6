package machineconfig

import (
	"encoding/base64"
	"strings"
	"testing"
	"time"

	clientconfig "github.com/siderolabs/talos/pkg/machinery/client/config"
	"github.com/siderolabs/talos/pkg/machinery/config"
	"github.com/siderolabs/talos/pkg/machinery/config/generate"
	"github.com/siderolabs/talos/pkg/machinery/config/generate/secrets"
	"github.com/siderolabs/talos/pkg/machinery/config/machine"
	"github.com/siderolabs/talos/pkg/machinery/nethelpers"
)

var daemon = Daemon{Endpoint: "sovra.example:7443", CA: []byte("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")}

func TestEnrollment(t *testing.T) {
	var e Enroller
	b, err := e.Config(daemon, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := Load(b)
	if err != nil {
		t.Fatalf("the enrollment configuration does not load: %v", err)
	}
	// Talos's metal platform validates a configuration from talos.config=
	// in a mode that requires install instructions.
	if _, err := load(b, runtimeMode{install: true}); err != nil {
		t.Fatalf("the enrollment configuration is refused on metal: %v", err)
	}
	if expr, err := cfg.Machine().Install().DiskMatchExpression(); err != nil || expr == nil {
		t.Fatalf("the enrollment configuration selects no install disk: %v", err)
	}
	if cfg.Machine().Type() != machine.TypeControlPlane || cfg.Cluster().Name() != enrollmentCluster {
		t.Fatalf("machine %s of cluster %s", cfg.Machine().Type(), cfg.Cluster().Name())
	}
	svc := cfg.ExtensionServiceConfigs()
	if len(svc) != 1 || svc[0].Name() != AgentService || !contains(svc[0].Environment(), "SOVRA_HOST=true") ||
		!contains(svc[0].Environment(), "SOVRA_DAEMON_ENDPOINT=sovra.example:7443") || len(svc[0].ConfigFiles()) != 2 {
		t.Fatalf("agent service %+v", svc)
	}
	for _, name := range []string{"STATE", "EPHEMERAL"} {
		v, ok := cfg.Volumes().ByName(name)
		if !ok || v.Encryption().Keys()[0].KMS() == nil || v.Encryption().Keys()[0].KMS().Endpoint() != "https://sovra.example:7443" {
			t.Fatalf("volume %s: %v", name, ok)
		}
	}
	if cfg.NetworkRules().DefaultAction() != nethelpers.DefaultActionBlock {
		t.Fatal("the Talos API is open to the network")
	}
	if !strings.Contains(string(b), "sovra-daemon-ca") {
		t.Fatal("no trusted root for the daemon's CA")
	}
	// Each configuration has its own Talos identity.
	other, err := e.Config(daemon, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	otherCfg, _ := Load(other)
	if string(otherCfg.RawV1Alpha1().MachineConfig.MachineCA.Crt) == string(cfg.RawV1Alpha1().MachineConfig.MachineCA.Crt) {
		t.Fatal("two enrollment configurations share their Talos CA")
	}
}

func TestMerge(t *testing.T) {
	bundle, bootstrap := bootstrapOf(t, machine.TypeWorker)
	ca, err := NewAgentCA(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	merged, err := Merge(bootstrap, Released{Daemon: daemon, ProviderID: "sovra://ek-abc", Generation: 3, AgentCA: ca})
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := Load(merged)
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.Machine().Kubelet().ExtraArgs()[ProviderIDArg]; len(got) != 1 || got[0] != "sovra://ek-abc" {
		t.Fatalf("provider-id %q", got)
	}
	if cfg.Cluster().Name() != "prod" || cfg.RawV1Alpha1().MachineConfig.MachineCA == nil {
		t.Fatal("the bootstrap data's identity was lost")
	}
	if n := len(cfg.RawV1Alpha1().MachineConfig.MachineAcceptedCAs); n != 1 {
		t.Fatalf("%d accepted CAs, want the agent's", n)
	}
	svc := cfg.ExtensionServiceConfigs()
	if len(svc) != 1 || !contains(svc[0].Environment(), "SOVRA_HOST_GENERATION=3") {
		t.Fatalf("agent service %+v", svc)
	}
	// The agent's talosconfig verifies the machine's Talos API with the
	// machine CA of the bootstrap data, and presents an agent certificate.
	for _, f := range svc[0].ConfigFiles() {
		if f.MountPath() != TalosconfigPath {
			continue
		}
		tc, err := clientconfig.FromString(f.Content())
		if err != nil {
			t.Fatal(err)
		}
		got, err := base64.StdEncoding.DecodeString(tc.Contexts[tc.Context].CA)
		if err != nil || string(got) != string(bundle.Certs.OS.Crt) {
			t.Fatalf("the agent's talosconfig does not trust the machine CA: %v", err)
		}
	}
	// Merging again replaces sovra's documents instead of adding more.
	again, err := Merge(merged, Released{Daemon: daemon, ProviderID: "sovra://ek-abc", Generation: 4, AgentCA: ca})
	if err != nil {
		t.Fatal(err)
	}
	cfg, _ = Load(again)
	if svc := cfg.ExtensionServiceConfigs(); len(svc) != 1 || !contains(svc[0].Environment(), "SOVRA_HOST_GENERATION=4") {
		t.Fatalf("after a second merge: %+v", svc)
	}
	if _, err := Merge([]byte("not: [a config"), Released{Daemon: daemon, AgentCA: ca}); err == nil {
		t.Fatal("merged bootstrap data that does not load")
	}
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// TestMergeAgentElection: a released control plane's agent is told its
// role, its address and the control plane's size (its bootstrap election),
// a worker's only its role and address; a role or address that is not one
// is refused.
func TestMergeAgentElection(t *testing.T) {
	_, bootstrap := bootstrapOf(t, machine.TypeControlPlane)
	ca, err := NewAgentCA(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	env := func(r Released) []string {
		t.Helper()
		r.Daemon, r.ProviderID, r.Generation, r.AgentCA = daemon, "sovra://ek-abc", 1, ca
		merged, err := Merge(bootstrap, r)
		if err != nil {
			t.Fatal(err)
		}
		cfg, err := Load(merged)
		if err != nil {
			t.Fatal(err)
		}
		return cfg.ExtensionServiceConfigs()[0].Environment()
	}
	got := env(Released{Role: RoleControlPlane, ExpectedControlPlanes: 3, NodeAddress: "10.0.0.5"})
	for _, want := range []string{"SOVRA_ROLE=controlplane", "SOVRA_BOOTSTRAP_EXPECTED_CONTROL_PLANES=3", "SOVRA_NODE_ADDRESS=10.0.0.5", "SOVRA_HOST_GENERATION=1",
		"SOVRA_PEER_TALOSCONFIG=" + PeerTalosconfigPath} {
		if !contains(got, want) {
			t.Errorf("control plane's agent environment %q lacks %s", got, want)
		}
	}
	got = env(Released{Role: RoleWorker, NodeAddress: "10.0.0.6"})
	for _, v := range got {
		if strings.HasPrefix(v, "SOVRA_BOOTSTRAP_EXPECTED_CONTROL_PLANES=") || strings.HasPrefix(v, "SOVRA_PEER_TALOSCONFIG=") {
			t.Errorf("worker's agent environment has %s", v)
		}
	}
	if !contains(got, "SOVRA_ROLE=worker") {
		t.Errorf("worker's agent environment %q lacks its role", got)
	}
	for _, bad := range []Released{{Role: "boss"}, {NodeAddress: "10.0.0.5/24"}} {
		bad.Daemon, bad.AgentCA = daemon, ca
		if _, err := Merge(bootstrap, bad); err == nil {
			t.Errorf("merged %+v", bad)
		}
	}
}

// bootstrapOf is the bootstrap data of a machine of type typ in a new
// cluster "prod", as the Talos bootstrap provider generates it, and the
// cluster's secrets.
func bootstrapOf(t *testing.T, typ machine.Type) (*secrets.Bundle, []byte) {
	t.Helper()
	bundle, err := secrets.NewBundle(secrets.NewFixedClock(time.Now()), config.TalosVersionCurrent)
	if err != nil {
		t.Fatal(err)
	}
	in, err := generate.NewInput("prod", "https://10.0.0.100:6443", "1.32.6", generate.WithSecretsBundle(bundle))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := in.Config(typ)
	if err != nil {
		t.Fatal(err)
	}
	data, err := cfg.EncodeBytes()
	if err != nil {
		t.Fatal(err)
	}
	return bundle, data
}
