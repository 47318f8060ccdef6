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

	"github.com/cosi-project/runtime/pkg/controller"
	"github.com/spf13/pflag"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	agentattest "github.com/sovra-dev/sovra/agent/attest"
	"github.com/sovra-dev/sovra/agent/config"
	statusctrl "github.com/sovra-dev/sovra/agent/controllers/status"
	"github.com/sovra-dev/sovra/agent/daemonconn"
	agentruntime "github.com/sovra-dev/sovra/agent/runtime"
	"github.com/sovra-dev/sovra/agent/status"
	"github.com/sovra-dev/sovra/internal/version"
)

// shutdownDeadline bounds a graceful stop.
const shutdownDeadline = 10 * time.Second

func runCommand(args []string, _, stderr io.Writer) int {
	cfg, code, ok := loadConfig(args, stderr)
	if !ok {
		return code
	}

	logger, err := newLogger(cfg.LogLevel, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "sovra-agent: creating the logger: %v\n", err)

		return exitFailed
	}
	defer logger.Sync() //nolint:errcheck

	logger.Info("sovra-agent starting", zap.String("version", version.Version), zap.String("role", string(cfg.Role)))

	var (
		extra    []controller.Controller
		attester *agentattest.Agent
		conn     *daemonconn.Conn
		why      string
	)

	// Without a TPM or UEFI the agent runs what needs neither.
	if unavailable := attestationUnavailable(cfg); unavailable != nil {
		warnUnavailable(cfg, unavailable, logger)

		why = unavailable.Error()
	} else {
		extra, attester, conn, err = attestationControllers(cfg, logger)
		if err != nil {
			logger.Error("setting up attestation failed", zap.Error(err))

			return exitFailed
		}

		if conn != nil {
			defer conn.Close() //nolint:errcheck
		}

		vols, keyConn, err := volumeControllers(cfg, attester, conn, logger)
		if err != nil {
			logger.Error("setting up the agent-managed volumes failed", zap.Error(err))

			return exitFailed
		}

		if keyConn != nil {
			defer keyConn.Close() //nolint:errcheck
		}

		extra = append(extra, vols...)

		hostCtrls, err := hostControllers(cfg, attester, conn, logger)
		if err != nil {
			logger.Error("setting up host mode failed", zap.Error(err))

			return exitFailed
		}

		extra = append(extra, hostCtrls...)
	}

	opts := agentruntime.Options{Config: cfg, Logger: logger}
	if link := clusterLink(cfg, attester, conn, logger); link != nil {
		opts.PeerSource, opts.Lease = link, link
	}

	host, _ := os.Hostname()
	extra = append(extra, &statusctrl.StatusController{
		Recorder:              status.NewRecorder(cfg.StateDir, version.Version, host, nil),
		Daemon:                cfg.DaemonEndpoint,
		Unavailable:           why,
		ExpectedControlPlanes: cfg.Bootstrap.ExpectedControlPlanes,
	})

	opts.Controllers = extra

	rt, err := agentruntime.New(opts)
	if err != nil {
		logger.Error("composing the agent failed", zap.Error(err))

		return exitFailed
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	done := make(chan error, 1)

	go func() { done <- rt.Run(ctx) }()

	select {
	case err = <-done:
	case <-ctx.Done():
		logger.Info("stopping")

		select {
		case err = <-done:
		case <-time.After(shutdownDeadline):
			err = errors.New("controllers did not stop within the shutdown deadline")
		}
	}

	if err != nil {
		logger.Error("sovra-agent failed", zap.Error(err))

		return exitFailed
	}

	logger.Info("sovra-agent stopped")

	return exitOK
}

// loadConfig loads and validates the configuration, printing every problem.
// When it is not ok, the command exits with the returned code.
func loadConfig(args []string, stderr io.Writer) (config.Config, int, bool) {
	cfg, err := config.Load(args, os.LookupEnv)
	if errors.Is(err, pflag.ErrHelp) {
		fmt.Fprintln(stderr, "usage: sovra-agent [run|discover] [flags]")
		fmt.Fprint(stderr, config.Usage())

		return cfg, exitOK, false
	}

	if err != nil {
		fmt.Fprintln(stderr, "sovra-agent: invalid configuration:")

		for _, p := range splitErrors(err) {
			fmt.Fprintf(stderr, "  - %v\n", p)
		}

		return cfg, exitUsage, false
	}

	return cfg, exitOK, true
}

func splitErrors(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok { //nolint:errorlint
		var out []error
		for _, e := range j.Unwrap() {
			out = append(out, splitErrors(e)...)
		}

		return out
	}

	return []error{err}
}

// newLogger returns a JSON logger at level, writing to w.
func newLogger(level string, w io.Writer) (*zap.Logger, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, fmt.Errorf("parsing log level: %w", err)
	}

	enc := zap.NewProductionEncoderConfig()
	enc.EncodeTime = zapcore.ISO8601TimeEncoder
	enc.EncodeDuration = zapcore.StringDurationEncoder

	core := zapcore.NewCore(zapcore.NewJSONEncoder(enc), zapcore.AddSync(w), lvl)

	return zap.New(core), nil
}
