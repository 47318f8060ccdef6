// Command sovrad is sovra's control-plane daemon: it holds the keys, verifies
// attestations and serves the Kubernetes API that kubectl, Helm and Cluster
// API talk to. Run `sovrad --help` for its flags and subcommands; each flag
// is also settable as a SOVRA_* environment variable. `sovrad keyring
// init|list|rotate FILE` manages the KMS master keyring; `sovrad healthcheck`
// exits 0 when the daemon configured by the same flags and variables is ready
// (a container health check); `sovrad ek-hash` prints the EK hash and record
// name of a TPM, to pre-register its node; `sovrad policy capture --from-node
// NAME` writes an AttestationPolicy from a known-good node's last verified
// PCRs and claims; `sovrad hosts boot-config` prints how machines boot into
// the pool and writes the enrollment configuration for boot media and
// user-data.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/go-logr/zapr"
	"github.com/sirupsen/logrus"
	"github.com/spf13/pflag"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"k8s.io/klog/v2"

	"github.com/sovra-dev/sovra/daemon/config"
	"github.com/sovra-dev/sovra/daemon/logging"
	"github.com/sovra-dev/sovra/daemon/server"
	"github.com/sovra-dev/sovra/internal/version"
)

// Exit codes.
const (
	exitOK     = 0
	exitFailed = 1
	exitUsage  = 2
)

// usageHead introduces `sovrad --help`: the subcommands, then the flags.
const usageHead = `sovrad: sovra's control-plane daemon (Kubernetes API, node API, Talos KMS, Cluster API).

Usage:
  sovrad [flags]                          run the daemon
  sovrad healthcheck [flags]              exit 0 when the daemon these flags configure is ready, 1 when not
  sovrad keyring init|list|rotate FILE    create, list or rotate the KMS master keyring (--master-key-file)
  sovrad ek-hash --cert|--pub FILE        print a TPM's EK hash and SovraNode name, to pre-register its node
  sovrad policy capture --from-node NAME  write an AttestationPolicy from a known-good node's last verified PCRs and claims
  sovrad hosts boot-config --server URL   print how machines boot into the pool; --out writes their enrollment configuration
  sovrad version                          print the version
  sovrad help, sovrad COMMAND --help      this text, or a command's

Every flag is also an environment variable, named in brackets: SOVRA_ and the
flag's name in capitals with _ for -. A flag on the command line wins over its
variable. An error about a value names where it came from.

Flags:
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		switch args[0] {
		case "version", "--version":
			fmt.Fprintln(stdout, version.Version)
			return exitOK
		case "help":
			fmt.Fprint(stdout, usageHead+config.New().Usage())
			return exitOK
		case "keyring":
			return keyringCommand(args[1:], stdout, stderr)
		case "healthcheck":
			return healthcheckCommand(args[1:], stdout, stderr)
		case "ek-hash":
			return ekHashCommand(args[1:], stdout, stderr)
		case "policy":
			return policyCommand(args[1:], stdout, stderr)
		case "hosts":
			return hostsCommand(args[1:], stdout, stderr)
		}
	}
	cfg := config.New()
	if err := cfg.Parse(args, os.Getenv); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			fmt.Fprint(stdout, usageHead+config.New().Usage())
			return exitOK
		}
		printErrors(stderr, "sovrad: bad arguments (sovrad --help lists the flags and commands)", err)
		return exitUsage
	}
	if err := cfg.Validate(); err != nil {
		printErrors(stderr, "sovrad: invalid configuration, nothing was changed", err)
		return exitUsage
	}
	log, err := newLogger(cfg.LogLevel)
	if err != nil {
		printErrors(stderr, "sovrad: setting up logging", err)
		return exitFailed
	}
	defer log.Sync() //nolint:errcheck

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go func() {
		<-ctx.Done()
		log.Info("shutting down", zap.Duration("deadline", cfg.ShutdownTimeout))
		time.Sleep(cfg.ShutdownTimeout)
		log.Error("graceful shutdown did not finish in time: exiting")
		os.Exit(exitFailed)
	}()

	// Go's default collector settings: GOGC=200 takes about a sixth off the
	// CPU per Unseal in a boot storm but costs about 60 MB of idle memory
	// (tests/kms BenchmarkBootStorm, tests/daemon BenchmarkDaemon); an
	// operator chooses it in the environment.
	gogc := os.Getenv("GOGC")
	if gogc == "" {
		gogc = "100"
	}
	log.Info("garbage collection", zap.String("GOGC", gogc))

	if err := server.Run(ctx, cfg, log); err != nil {
		log.Error("sovrad failed", zap.Error(err))
		return exitFailed
	}
	return exitOK
}

// printErrors prints each of a joined error's errors on its own line.
func printErrors(w io.Writer, title string, err error) {
	fmt.Fprintf(w, "%s:\n", title)
	errs := []error{err}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		errs = j.Unwrap()
	}
	for _, e := range errs {
		fmt.Fprintf(w, "  - %v\n", e)
	}
}

// newLogger builds the daemon's JSON logger and routes the logs of the
// libraries it runs (klog from Kubernetes, logrus from kine) through it.
func newLogger(level string) (*zap.Logger, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, err
	}
	zc := zap.NewProductionConfig()
	zc.Level = zap.NewAtomicLevelAt(lvl)
	zc.Sampling = nil
	zc.DisableStacktrace = true
	zc.EncoderConfig.TimeKey = "time"
	zc.EncoderConfig.EncodeTime = zapcore.RFC3339NanoTimeEncoder
	log, err := zc.Build()
	if err != nil {
		return nil, err
	}
	// Quiet start: at info, the libraries say only their warnings and
	// errors (the API server's ~120 start-up lines would bury the few that
	// matter); --log-level debug brings their info lines back.
	klog.SetLogger(zapr.NewLogger(logging.Library(log.Named("k8s"))))
	logrus.SetFormatter(&logrus.JSONFormatter{})
	if lvl >= zapcore.InfoLevel {
		logrus.SetLevel(logrus.WarnLevel)
	}
	return log, nil
}
