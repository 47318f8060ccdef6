// Command talosmachine runs one simulated Talos machine (package bootsim)
// until SIGTERM or SIGINT switch it off: it boots from its state directory,
// fetches talos.config= when it has no configuration, seals and unseals its
// volumes with the KMS its configuration names, serves the Talos API and
// runs its extension services in containers. It needs root (containers).
//
//	talosmachine --dir DIR --uuid UUID --address 10.66.0.11/24 \
//	    --talos-config 'https://sovrad:7444/boot/config?uuid=${uuid}' \
//	    --roots ca-bundle.pem --environment SOVRA_TPM=swtpm:10.66.0.1:2321 \
//	    --event-log binary_bios_measurements --device /dev/tpmrm0 \
//	    --extension extension/sovra-agent.yaml=bin/sovra-agent \
//	    --cpu 4 --memory-module 8192 --disk /dev/sda=107374182400
//
// It logs one JSON line per step to stderr and keeps its status in
// <dir>/status.json; package bootsimtest runs it for the stories.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/siderolabs/talos/pkg/machinery/resources/block"
	"github.com/siderolabs/talos/pkg/machinery/resources/hardware"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/sovra-dev/sovra/tests/talosfake/bootsim"
	"github.com/sovra-dev/sovra/tests/talosfake/container"
)

// proxyVariables are cleared at start: like machined, the machine takes
// its proxies only from talos.environment= (--environment).
var proxyVariables = []string{"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy", "all_proxy"}

func main() {
	container.Main()

	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "talosmachine: %v\n", err)
		os.Exit(1)
	}
}

// list is a repeatable flag.
type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

func run() error {
	var (
		cfg                         bootsim.Config
		address, mac                string
		envs, cpus, mems, disks     list
		devices, extensions         list
		bootMedia                   bool
		arch, manufacturer, product string
	)

	flag.StringVar(&cfg.Dir, "dir", "", "the machine's state directory (disks, META, logs, status.json)")
	flag.StringVar(&cfg.UUID, "uuid", "", "SMBIOS system UUID")
	flag.StringVar(&cfg.Serial, "serial", "", "SMBIOS serial number")
	flag.StringVar(&mac, "mac", "", "hardware address of the first link")
	flag.StringVar(&address, "address", "", "the machine's address with its prefix (10.66.0.11/24); the Talos API also listens on 127.0.0.1")
	flag.IntVar(&cfg.APIPort, "api-port", bootsim.DefaultAPIPort, "Talos API port")
	flag.IntVar(&cfg.TrustdPort, "trustd-port", bootsim.DefaultTrustdPort, "trustd port (control-plane nodes)")
	flag.StringVar(&cfg.ConfigURL, "talos-config", "", "the talos.config= kernel argument")
	flag.StringVar(&cfg.EmbeddedConfig, "embedded-config", "", "a configuration embedded in the boot media")
	flag.StringVar(&cfg.Roots, "roots", "", "PEM bundle standing for Talos's built-in trusted roots")
	flag.Var(&envs, "environment", "a talos.environment= kernel argument, KEY=VALUE (repeatable)")
	flag.BoolVar(&bootMedia, "boot-media", false, "boot installation media: the first boot with a configuration installs Talos and reboots")
	flag.StringVar(&arch, "arch", "amd64", "architecture")
	flag.StringVar(&manufacturer, "manufacturer", "", "SMBIOS manufacturer")
	flag.StringVar(&product, "product", "", "SMBIOS product name")
	flag.Var(&cpus, "cpu", "a processor socket: CORES[:THREADS[:MHZ]] (repeatable)")
	flag.Var(&mems, "memory-module", "a memory module's size in MiB (repeatable)")
	flag.Var(&disks, "disk", "a disk: PATH=BYTES[:MODEL] (repeatable)")
	flag.StringVar(&cfg.EventLog, "event-log", "", "TPM event log shown at securityfs tpm0/binary_bios_measurements")
	flag.StringVar(&cfg.Lockdown, "lockdown", bootsim.DefaultLockdown, "securityfs lockdown content")
	flag.StringVar(&cfg.SecureBoot, "secure-boot", "", "the SecureBoot EFI variable: enabled, disabled, or empty for none")
	flag.Var(&devices, "device", "a device path the machine has, e.g. /dev/tpmrm0 (repeatable)")
	flag.Var(&extensions, "extension", "an installed extension service: SPEC.yaml=ROOTFS_DIR_OR_BINARY (repeatable)")
	flag.DurationVar(&cfg.VolumeRetry, "volume-retry", bootsim.DefaultVolumeRetry, "retry interval of a volume that does not open")
	flag.DurationVar(&cfg.StopTimeout, "stop-timeout", bootsim.DefaultStopTimeout, "time a service has after SIGTERM")
	flag.DurationVar(&cfg.RestartInterval, "restart-interval", bootsim.DefaultRestartInterval, "time before an exited service restarts")
	flag.DurationVar(&cfg.DownloadTimeout, "download-timeout", 0, "bound of the talos.config= download (default Talos's 3h)")
	flag.DurationVar(&cfg.DownloadAttemptTimeout, "download-attempt-timeout", 0, "bound of one download attempt (default Talos's 3m)")
	flag.Parse()

	var errs []error

	if address != "" {
		p, err := netip.ParsePrefix(address)
		if err != nil {
			errs = append(errs, fmt.Errorf("--address: %w", err))
		}

		cfg.Address = p
	}

	if mac != "" {
		hw, err := net.ParseMAC(mac)
		if err != nil {
			errs = append(errs, fmt.Errorf("--mac: %w", err))
		}

		cfg.MAC = hw
	}

	cfg.Environment, cfg.BootMedia, cfg.Devices = envs, bootMedia, devices
	cfg.Hardware = bootsim.Hardware{Arch: arch, Manufacturer: manufacturer, ProductName: product}

	for _, c := range cpus {
		p, err := parseCPU(c)
		errs = append(errs, err)
		cfg.Hardware.Processors = append(cfg.Hardware.Processors, p)
	}

	for _, mm := range mems {
		size, err := strconv.ParseUint(mm, 10, 32)
		if err != nil {
			errs = append(errs, fmt.Errorf("--memory-module %q: %w", mm, err))
		}

		cfg.Hardware.MemoryModules = append(cfg.Hardware.MemoryModules, hardware.MemoryModuleSpec{Size: uint32(size)})
	}

	for _, d := range disks {
		disk, err := parseDisk(d)
		errs = append(errs, err)
		cfg.Hardware.Disks = append(cfg.Hardware.Disks, disk)
	}

	for _, e := range extensions {
		spec, rootfs, ok := strings.Cut(e, "=")
		if !ok {
			errs = append(errs, fmt.Errorf("--extension %q is not SPEC=ROOTFS", e))
		}

		cfg.Extensions = append(cfg.Extensions, bootsim.Extension{Spec: spec, Rootfs: rootfs})
	}

	if err := errors.Join(errs...); err != nil {
		return err
	}

	zcfg := zap.NewProductionConfig()
	zcfg.EncoderConfig.EncodeTime = zapcore.ISO8601TimeEncoder
	zcfg.Sampling = nil

	logger, err := zcfg.Build()
	if err != nil {
		return err
	}

	defer logger.Sync() //nolint:errcheck

	logger = logger.With(zap.String("machine", cfg.UUID))
	cfg.Logger = logger

	// The retry library logs with the standard logger, as in machined.
	defer zap.RedirectStdLog(logger)()

	for _, k := range proxyVariables {
		os.Unsetenv(k) //nolint:errcheck
	}

	for _, kv := range cfg.Environment {
		k, v, _ := strings.Cut(kv, "=")
		os.Setenv(k, v) //nolint:errcheck
	}

	m, err := bootsim.New(cfg)
	if err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	return m.Run(ctx)
}

// parseCPU reads CORES[:THREADS[:MHZ]].
func parseCPU(s string) (hardware.ProcessorSpec, error) {
	parts := strings.Split(s, ":")

	nums := make([]uint32, 3)

	for i, p := range parts {
		if i >= len(nums) {
			return hardware.ProcessorSpec{}, fmt.Errorf("--cpu %q: too many fields", s)
		}

		n, err := strconv.ParseUint(p, 10, 32)
		if err != nil {
			return hardware.ProcessorSpec{}, fmt.Errorf("--cpu %q: %w", s, err)
		}

		nums[i] = uint32(n)
	}

	if nums[1] == 0 {
		nums[1] = nums[0]
	}

	return hardware.ProcessorSpec{
		CoreCount: nums[0], CoreEnabled: nums[0], ThreadCount: nums[1], MaxSpeed: nums[2], BootSpeed: nums[2],
		Manufacturer: "Simulated", ProductName: "Simulated CPU",
	}, nil
}

// parseDisk reads PATH=BYTES[:MODEL].
func parseDisk(s string) (block.DiskSpec, error) {
	path, rest, ok := strings.Cut(s, "=")
	if !ok {
		return block.DiskSpec{}, fmt.Errorf("--disk %q is not PATH=BYTES[:MODEL]", s)
	}

	sizeStr, model, _ := strings.Cut(rest, ":")

	size, err := strconv.ParseUint(sizeStr, 10, 64)
	if err != nil {
		return block.DiskSpec{}, fmt.Errorf("--disk %q: %w", s, err)
	}

	return block.DiskSpec{DevPath: path, Size: size, Model: model, IOSize: 512, SectorSize: 512, Transport: "virtio"}, nil
}
