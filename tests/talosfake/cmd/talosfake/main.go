// Command talosfake runs one fake Talos node (package talosfake) so that a
// network-namespace test can run one per namespace beside the real agent.
//
//	talosfake --pki-dir DIR --address 10.66.0.11 --boot-time 1700000000 \
//	          --machine-type controlplane --state-dir DIR
//
// It serves until SIGTERM or SIGINT. Calls naming other nodes (gRPC metadata
// "nodes" or "node") are forwarded to their fakes on the same --port.
// Bootstrap calls are logged and appended to <state-dir>/bootstrap.log.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	machinetype "github.com/siderolabs/talos/pkg/machinery/config/machine"
	"go.uber.org/zap"

	"github.com/sovra-dev/sovra/tests/talosfake"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "talosfake: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		pkiDir   = flag.String("pki-dir", "", "directory with ca.crt and ca.key (talosfake.PKI.Write)")
		address  = flag.String("address", "", "node address: listened on, and named by the server certificate")
		port     = flag.Int("port", 50000, "apid port, listened on and dialed on the other nodes for calls routed to them")
		mtype    = flag.String("machine-type", "controlplane", "controlplane, init or worker")
		bootTime = flag.Int64("boot-time", 0, "boot time in seconds since the epoch (default: now)")
		stateDir = flag.String("state-dir", "", "directory for the etcd data marker and the Bootstrap log")
		etcdData = flag.Bool("etcd-data", false, "start with etcd data, as after a bootstrap")
		hostname = flag.String("hostname", "", "hostname (default: talos-<address>)")
		unsynced = flag.Bool("time-unsynced", false, "report the clock as not in sync yet")
	)

	flag.Parse()

	addr, err := netip.ParseAddr(*address)
	if err != nil {
		return fmt.Errorf("parsing --address: %w", err)
	}

	mt, err := machinetype.ParseType(*mtype)
	if err != nil {
		return fmt.Errorf("parsing --machine-type: %w", err)
	}

	ca, err := talosfake.ReadCA(*pkiDir)
	if err != nil {
		return err
	}

	bt := time.Now()
	if *bootTime != 0 {
		bt = time.Unix(*bootTime, 0)
	}

	if *hostname == "" {
		*hostname = "talos-" + addr.String()
	}

	logger, err := zap.NewProduction()
	if err != nil {
		return err
	}

	logger = logger.With(zap.String("node", addr.String()))

	node, err := talosfake.New(talosfake.Options{
		Address: addr, APIPort: *port, CA: ca, MachineType: mt, BootTime: bt, Hostname: *hostname,
		StateDir: *stateDir, EtcdData: *etcdData, TimeUnsynced: *unsynced, Logger: logger,
	})
	if err != nil {
		return err
	}

	lis, err := net.Listen("tcp", net.JoinHostPort(addr.String(), strconv.Itoa(*port)))
	if err != nil {
		return fmt.Errorf("listening: %w", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	logger.Info("fake Talos node serving", zap.String("machine_type", mt.String()), zap.Int64("boot_time", bt.Unix()))

	return node.Serve(ctx, lis)
}
