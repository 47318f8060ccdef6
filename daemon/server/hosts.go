package server

import (
	"crypto/tls"
	"fmt"
	"net"
	"os"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/record"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/sovra-dev/sovra/daemon/bootconfig"
	"github.com/sovra-dev/sovra/daemon/capi"
	"github.com/sovra-dev/sovra/daemon/config"
	"github.com/sovra-dev/sovra/daemon/datadir"
	"github.com/sovra-dev/sovra/daemon/hosts"
	"github.com/sovra-dev/sovra/daemon/kms"
	"github.com/sovra-dev/sovra/daemon/machineconfig"
)

// hostsEventSource names the metadata service in events.
const hostsEventSource = "sovra-hosts"

// machineDaemon is how machines reach this daemon: --node-endpoint, or the
// advertise address and the node API's port; and the node CA.
func machineDaemon(cfg *config.Config, files *datadir.Files) (machineconfig.Daemon, error) {
	endpoint := cfg.Hosts.NodeEndpoint
	if endpoint == "" {
		_, port, err := net.SplitHostPort(cfg.NodeAPI.Listen)
		if err != nil {
			return machineconfig.Daemon{}, fmt.Errorf("--node-listen %q: %w", cfg.NodeAPI.Listen, err)
		}
		endpoint = net.JoinHostPort(files.AdvertiseIP.String(), port)
	}
	ca, err := os.ReadFile(files.NodeCACert)
	if err != nil {
		return machineconfig.Daemon{}, fmt.Errorf("reading the node CA: %w", err)
	}
	return machineconfig.Daemon{Endpoint: endpoint, CA: ca}, nil
}

// newHostService builds the metadata service the agents of the pool call
// on the node API.
func newHostService(cfg *config.Config, d machineconfig.Daemon, loopback *rest.Config, log *zap.Logger) (*hosts.Service, error) {
	restCfg := rest.CopyConfig(loopback)
	restCfg.ContentType = runtime.ContentTypeJSON
	scheme := capi.NewScheme()
	c, err := client.New(restCfg, client.Options{Scheme: scheme})
	if err != nil {
		return nil, fmt.Errorf("creating a client for the host pool: %w", err)
	}
	cs, err := typedcorev1.NewForConfig(loopback)
	if err != nil {
		return nil, fmt.Errorf("creating the host pool's event client: %w", err)
	}
	b := record.NewBroadcaster()
	b.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: cs.Events("")})
	events := b.NewRecorder(scheme, corev1.EventSource{Component: hostsEventSource})
	return hosts.New(hosts.Config{
		Daemon: d, MaxAttestationAge: cfg.Hosts.MaxAttestationAge, AutoAccept: cfg.Hosts.AutoAccept,
	}, c, events, nil, log.Named("hosts"))
}

// newBootServer builds the boot server (--boot-listen) on the node API's
// TLS identity. keys may be nil (the KMS is off).
func newBootServer(cfg *config.Config, d machineconfig.Daemon, files *datadir.Files, keys *kms.Service, log *zap.Logger) (*bootconfig.Server, error) {
	cert, err := tls.LoadX509KeyPair(files.NodeServingCert, files.NodeServingKey)
	if err != nil {
		return nil, fmt.Errorf("loading the node API certificate for the boot server: %w", err)
	}
	var exp bootconfig.Expecter
	if keys != nil {
		exp = keys
	}
	return bootconfig.New(bootconfig.Config{
		Listen: cfg.Hosts.BootListen, Daemon: d, MaxPending: cfg.Hosts.MaxPending,
		TLS: &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
	}, exp, log.Named("boot"))
}
