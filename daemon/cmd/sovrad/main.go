// Command sovrad is sovra's control-plane daemon: it holds the keys, verifies
// attestations and serves the Kubernetes API that kubectl, Helm and Cluster
// API talk to. Run `sovrad --help` for its flags; each is also settable as a
// SOVRA_* environment variable. `sovrad keyring list|rotate FILE` lists or
// rotates the KMS master keyring; `sovrad healthcheck` exits 0 when the
// daemon configured by the same flags and variables is ready (a container
// health check); `sovrad policy capture --from-node NAME` writes an
// AttestationPolicy from a known-good node's last verified PCRs and claims;
// `sovrad hosts boot-config` prints how machines boot into the pool and
// writes the enrollment configuration for boot media and user-data.
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
	"github.com/sovra-dev/sovra/daemon/server"
	"github.com/sovra-dev/sovra/internal/version"
)

// Exit codes.
const (
	exitOK     = 0
	exitFailed = 1
	exitUsage  = 2
)

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

func run(args []string, stderr io.Writer) int {
	if len(args) == 1 && (args[0] == "version" || args[0] == "--version") {
		fmt.Println(version.Version)
		return exitOK
	}
	if len(args) > 0 && args[0] == "keyring" {
		return keyringCommand(args[1:], os.Stdout, stderr)
	}
	if len(args) > 0 && args[0] == "healthcheck" {
		return healthcheckCommand(args[1:], os.Stdout, stderr)
	}
	if len(args) > 0 && args[0] == "policy" {
		return policyCommand(args[1:], os.Stdout, stderr)
	}
	if len(args) > 0 && args[0] == "hosts" {
		return hostsCommand(args[1:], os.Stdout, stderr)
	}
	cfg := config.New()
	if err := cfg.Parse(args, os.Getenv); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return exitOK
		}
		printErrors(stderr, "sovrad: bad arguments", err)
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
	klog.SetLogger(zapr.NewLogger(log.Named("k8s")))
	logrus.SetFormatter(&logrus.JSONFormatter{})
	if lvl > zapcore.InfoLevel {
		logrus.SetLevel(logrus.WarnLevel)
	}
	return log, nil
}
