package bootsim

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"time"

	"github.com/siderolabs/crypto/x509"
	talosconfig "github.com/siderolabs/talos/pkg/machinery/config"
	"go.uber.org/zap"

	"github.com/sovra-dev/sovra/tests/talosfake"
	"github.com/sovra-dev/sovra/tests/talosfake/trustd"
)

// trustdRetry is how long a worker waits before asking trustd again after
// a failed round (the APIController's restart backoff, roughly).
const trustdRetry = 5 * time.Second

// apiServer is the boot's Talos API (apid with machined behind it) and, on
// a control-plane node, trustd.
type apiServer struct {
	node   *talosfake.Node
	api    *guardedListener
	trustd *guardedListener
}

// startAPI starts the Talos API under cfg's PKI: a control-plane node
// issues its certificate from machine.ca; a worker asks the trustd of its
// control-plane endpoint for one first (secrets/api.go), and serves only
// once it has it.
func (b *bootRun) startAPI() error {
	m := b.m
	cfg := b.config()
	addr := m.cfg.Address.Addr()
	fw := b.firewall(cfg)

	apiLis, err := listenGuarded(addr, m.cfg.APIPort, fw, m.log)
	if err != nil {
		return fmt.Errorf("listening for the Talos API: %w", err)
	}

	srv := &apiServer{api: apiLis}

	b.mu.Lock()
	b.api = srv
	b.mu.Unlock()

	b.services.Go(func() {
		<-b.svcCtx.Done()
		apiLis.Close() //nolint:errcheck
	})

	sec := cfg.Machine().Security()

	if cfg.Machine().Type().IsControlPlane() {
		if sec.IssuingCA() == nil || len(sec.IssuingCA().Key) == 0 {
			return fmt.Errorf("starting the Talos API: machine.ca of a control-plane node has no key")
		}

		if err := b.startTrustd(srv, fw, cfg); err != nil {
			return err
		}

		return b.serveAPI(srv, sec.IssuingCA(), sec.AcceptedCAs(), nil)
	}

	b.services.Go(func() { b.workerAPI(srv, cfg) })

	return nil
}

// sans are the names of the node's certificates (CertSANAPI): machine.certSANs,
// the node's addresses, 127.0.0.1, the hostname.
func (b *bootRun) sans(cfg talosconfig.Config) []string {
	sans := slices.Clone(cfg.Machine().Security().CertSANs())

	if a := b.m.cfg.Address; a.IsValid() {
		sans = append(sans, a.Addr().String())
	}

	return append(sans, b.hostname(cfg))
}

// serveAPI serves the Talos API with the given PKI.
func (b *bootRun) serveAPI(srv *apiServer, ca *x509.PEMEncodedCertificateAndKey, accepted []*x509.PEMEncodedCertificate, serverCert *x509.PEMEncodedCertificateAndKey) error {
	m := b.m
	cfg := b.config()

	node, err := talosfake.New(talosfake.Options{
		Address:     m.cfg.Address.Addr(),
		APIPort:     m.cfg.APIPort,
		CA:          ca,
		AcceptedCAs: accepted,
		ServerCert:  serverCert,
		CertSANs:    b.sans(cfg),
		MachineType: cfg.Machine().Type(),
		BootTime:    time.Unix(b.bootTime, 0),
		Hostname:    b.hostname(cfg),
		Arch:        m.cfg.Hardware.Arch,
		StateDir:    filepath.Join(b.eph.Data(), "lib", "etcd"),
		State:       b.cosi,
		Lifecycle:   b,
		Logger:      m.log.With(zap.Int("boot", b.num)),
	})
	if err != nil {
		return fmt.Errorf("starting the Talos API: %w", err)
	}

	b.mu.Lock()
	srv.node = node
	b.mu.Unlock()

	b.services.Go(func() {
		if err := node.Serve(b.svcCtx, srv.api); err != nil && b.svcCtx.Err() == nil {
			m.log.Error("serving the Talos API", zap.Error(err))
		}
	})

	m.log.Info(MsgAPIServing, zap.Int("boot", b.num), zap.Int("port", m.cfg.APIPort),
		zap.String("machine_type", cfg.Machine().Type().String()), zap.Bool("firewall_block", b.firewall(cfg).block))

	return nil
}

// workerAPI gets the worker's API certificate from trustd, then serves.
func (b *bootRun) workerAPI(srv *apiServer, cfg talosconfig.Provider) {
	m := b.m
	sec := cfg.Machine().Security()

	accepted := slices.Clone(sec.AcceptedCAs())
	if sec.IssuingCA() != nil {
		accepted = append(accepted, &x509.PEMEncodedCertificate{Crt: sec.IssuingCA().Crt})
	}

	for b.svcCtx.Err() == nil {
		m.log.Info(MsgTrustdAsking, zap.Int("boot", b.num), zap.String("endpoint", cfg.Cluster().Endpoint().Host))

		serverCert, ca, err := b.trustdCertificate(cfg, accepted)
		if err == nil {
			m.log.Info(MsgTrustdCertified, zap.Int("boot", b.num))

			if err := b.serveAPI(srv, nil, []*x509.PEMEncodedCertificate{{Crt: ca}}, serverCert); err != nil {
				m.log.Error("starting the Talos API", zap.Error(err))
			}

			return
		}

		m.log.Warn("worker: no Talos API certificate from trustd yet", zap.Int("boot", b.num), zap.Error(err))

		select {
		case <-b.svcCtx.Done():
			return
		case <-time.After(trustdRetry):
		}
	}
}

// trustdCertificate is generateWorker: a CSR for the node's names to the
// trustd of the control-plane endpoint, with the machine token.
func (b *bootRun) trustdCertificate(cfg talosconfig.Provider, accepted []*x509.PEMEncodedCertificate) (*x509.PEMEncodedCertificateAndKey, []byte, error) {
	if len(accepted) == 0 {
		return nil, nil, fmt.Errorf("no accepted CAs")
	}

	if cfg.Cluster() == nil || cfg.Cluster().Endpoint() == nil {
		return nil, nil, fmt.Errorf("no control-plane endpoint")
	}

	// StaticEndpointController: the endpoint's host, resolved.
	ctx, cancel := context.WithTimeout(b.svcCtx, time.Minute)
	defer cancel()

	host := cfg.Cluster().Endpoint().Hostname()

	addrs, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return nil, nil, fmt.Errorf("error resolving %q: %w", host, err)
	}

	endpoints := make([]string, 0, len(addrs))
	for _, a := range addrs {
		endpoints = append(endpoints, a.Unmap().String())
	}

	caCert, err := accepted[len(accepted)-1].GetCert()
	if err != nil {
		return nil, nil, fmt.Errorf("failed to parse CA certificate: %w", err)
	}

	var ips []net.IP

	var names []string

	for _, san := range b.sans(cfg) {
		if ip, err := netip.ParseAddr(san); err == nil {
			ips = append(ips, ip.AsSlice())
		} else {
			names = append(names, san)
		}
	}

	ips = append(ips, net.IPv4(127, 0, 0, 1))

	csr, identity, err := x509.NewCSRAndIdentityFromCA(caCert, x509.IPAddresses(ips), x509.DNSNames(names), x509.CommonName(b.hostname(cfg)))
	if err != nil {
		return nil, nil, fmt.Errorf("failed to generate API server CSR: %w", err)
	}

	ca, crt, err := trustd.Identity(ctx, cfg.Machine().Security().Token(), endpoints, accepted, csr)
	if err != nil {
		return nil, nil, err
	}

	identity.Crt = crt

	return identity, ca, nil
}

// startTrustd serves trustd on a control-plane node.
func (b *bootRun) startTrustd(srv *apiServer, fw *firewall, cfg talosconfig.Provider) error {
	m := b.m
	sec := cfg.Machine().Security()

	cert, err := talosfake.IssueServerCertificate(sec.IssuingCA(), m.cfg.Address.Addr(), b.sans(cfg))
	if err != nil {
		return fmt.Errorf("issuing trustd's certificate: %w", err)
	}

	lis, err := listenGuarded(m.cfg.Address.Addr(), m.cfg.TrustdPort, fw, m.log)
	if err != nil {
		return fmt.Errorf("listening for trustd: %w", err)
	}

	b.mu.Lock()
	srv.trustd = lis
	b.mu.Unlock()

	accepted := append(slices.Clone(sec.AcceptedCAs()), &x509.PEMEncodedCertificate{Crt: sec.IssuingCA().Crt})
	t := &trustd.Server{Token: sec.Token(), CA: sec.IssuingCA(), AcceptedCAs: accepted, ServerCert: cert, Logger: m.log}

	b.services.Go(func() {
		if err := t.Serve(b.svcCtx, lis); err != nil && b.svcCtx.Err() == nil {
			m.log.Error("serving trustd", zap.Error(err))
		}
	})

	return nil
}

// firewall is cfg's ingress firewall for this machine.
func (b *bootRun) firewall(cfg talosconfig.Config) *firewall {
	own := []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.IPv6Loopback()}
	if a := b.m.cfg.Address; a.IsValid() {
		own = append(own, a.Addr())
	}

	return firewallOf(cfg, own...)
}
