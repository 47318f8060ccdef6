package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os/signal"
	"syscall"
	"time"

	"github.com/sovra-dev/sovra/agent/config"
	discoveryctrl "github.com/sovra-dev/sovra/agent/controllers/discovery"
	"github.com/sovra-dev/sovra/agent/controllers/discovery/cidrscan"
	"github.com/sovra-dev/sovra/agent/resources/discovery"
	agentruntime "github.com/sovra-dev/sovra/agent/runtime"
	"github.com/sovra-dev/sovra/agent/runtime/talosapi"
)

// discoverReport is the JSON the discover command prints.
type discoverReport struct {
	NetworkCIDR string `json:"networkCIDR"`
	// Addresses is the number of addresses scanned.
	Addresses int `json:"addresses"`
	// Open is the number of addresses with the Talos API port open.
	Open int `json:"open"`
	// ScanMillis is the time of the TCP scan, ProbeMillis of the verified
	// Talos API reads that follow it.
	ScanMillis  float64 `json:"scanMillis"`
	ProbeMillis float64 `json:"probeMillis"`
	Concurrency int     `json:"concurrency"`
	// ConnectTimeoutMillis is the cost of one dead address.
	ConnectTimeoutMillis float64             `json:"connectTimeoutMillis"`
	Round                discovery.RoundSpec `json:"round"`
}

func discoverCommand(args []string, stdout, stderr io.Writer) int {
	cfg, code, ok := loadConfig(args, stderr)
	if !ok {
		return code
	}

	if !cfg.Bootstrap.Enabled() {
		fmt.Fprintln(stderr, "sovra-agent: discover needs a network CIDR (SOVRA_BOOTSTRAP_NETWORK_CIDR)")

		return exitUsage
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	report, err := discover(ctx, cfg)
	if err != nil {
		fmt.Fprintf(stderr, "sovra-agent: %v\n", err)

		return exitFailed
	}

	enc := json.NewEncoder(stdout)
	enc.SetIndent("", "  ")

	if err := enc.Encode(report); err != nil {
		fmt.Fprintf(stderr, "sovra-agent: writing the report: %v\n", err)

		return exitFailed
	}

	return exitOK
}

func discover(ctx context.Context, cfg config.Config) (discoverReport, error) {
	b := cfg.Bootstrap

	self, err := agentruntime.SelfAddress(cfg, nil)
	if err != nil {
		self = cfg.NodeAddress // discovery works without a local address
	}

	tlsConfig, err := talosapi.LoadTLS(cfg.TalosConfigPath)
	if err != nil {
		return discoverReport{}, err
	}

	scanner := &cidrscan.Scanner{Prefix: b.NetworkCIDR, Port: cfg.TalosAPIPort, Concurrency: b.ScanConcurrency, Timeout: b.ConnectTimeout}
	prober := &talosapi.Client{TLS: tlsConfig, Port: cfg.TalosAPIPort, Timeout: b.APITimeout, Local: self}

	start := time.Now()

	addrs, err := scanner.Peers(ctx)
	if err != nil {
		return discoverReport{}, err
	}

	scanned := time.Since(start)
	round, _ := discoveryctrl.ProbeAll(ctx, prober, self, addrs, b.ScanConcurrency)
	probed := time.Since(start) - scanned

	round.Number = 1
	round.DurationMillis = time.Since(start).Milliseconds()

	return discoverReport{
		NetworkCIDR:          b.NetworkCIDR.String(),
		Addresses:            len(cidrscan.Hosts(b.NetworkCIDR)),
		Open:                 len(addrs),
		ScanMillis:           float64(scanned.Microseconds()) / 1000,
		ProbeMillis:          float64(probed.Microseconds()) / 1000,
		Concurrency:          b.ScanConcurrency,
		ConnectTimeoutMillis: float64(b.ConnectTimeout.Microseconds()) / 1000,
		Round:                round,
	}, nil
}
