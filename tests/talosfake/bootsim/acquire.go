package bootsim

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"time"

	talosconfig "github.com/siderolabs/talos/pkg/machinery/config"
	"github.com/siderolabs/talos/pkg/machinery/config/configloader"
	"go.uber.org/zap"

	"github.com/sovra-dev/sovra/tests/talosfake/metalurl"
)

// The controller runtime's restart backoff (cenkalti/backoff defaults): an
// AcquireController that failed (a refused configuration) runs again
// after it, and starts over from STATE.
const (
	restartBackoffInitial = 500 * time.Millisecond
	restartBackoffMax     = time.Minute
	restartBackoffFactor  = 1.5
)

// runtimeMode is validation.RuntimeMode.
type runtimeMode struct {
	name            string
	requiresInstall bool
}

func (m runtimeMode) String() string        { return m.name }
func (m runtimeMode) RequiresInstall() bool { return m.requiresInstall }
func (m runtimeMode) InContainer() bool     { return false }

var (
	// diskMode validates a configuration from STATE or the boot media
	// (validationModeDiskConfig).
	diskMode = runtimeMode{name: "diskConfig"}
	// metalMode is the metal platform's mode: a configuration from the
	// platform must say where to install.
	metalMode = runtimeMode{name: "metal", requiresInstall: true}
)

// acquire gets the machine configuration as the AcquireController does:
// STATE, then the embedded configuration, then the platform (talos.config=);
// the first complete one wins. nil means none (maintenance). A refused
// configuration is logged and the whole acquisition runs again after the
// controller's restart backoff.
func (b *bootRun) acquire(ctx context.Context) (talosconfig.Provider, string, error) {
	backoff := restartBackoffInitial

	for {
		cfg, source, err := b.acquireOnce(ctx)
		if err == nil {
			return cfg, source, nil
		}

		if ctx.Err() != nil {
			return nil, "", ctx.Err()
		}

		b.m.log.Error(MsgConfigRefused, zap.Int("boot", b.num), zap.Error(err), zap.Duration("retry_in", backoff))
		b.m.setPhase(PhaseConfigRefused, err)

		select {
		case <-ctx.Done():
			return nil, "", ctx.Err()
		case <-time.After(backoff):
		}

		backoff = min(time.Duration(float64(backoff)*restartBackoffFactor), restartBackoffMax)
	}
}

func (b *bootRun) acquireOnce(ctx context.Context) (talosconfig.Provider, string, error) {
	m := b.m

	if b.stateOpen {
		cfg, err := b.loadFromState()
		if err != nil {
			return nil, "", err
		}

		if cfg != nil {
			if cfg.CompleteForBoot() {
				return cfg, sourceState, nil
			}

			return nil, "", nil
		}
	}

	var partial talosconfig.Provider

	if m.cfg.EmbeddedConfig != "" {
		data, err := os.ReadFile(m.cfg.EmbeddedConfig)
		if err != nil {
			return nil, "", fmt.Errorf("failed to read embedded config: %w", err)
		}

		m.log.Info("loading embedded config", zap.Int("boot", b.num))

		cfg, err := configloader.NewFromBytes(data)
		if err != nil {
			return nil, "", fmt.Errorf("failed to load config from embedded: %w", err)
		}

		if err := validate(ctx, cfg, diskMode, nil, m.log); err != nil {
			return nil, "", fmt.Errorf("failed to validate embedded config: %w", err)
		}

		if cfg.CompleteForBoot() {
			return cfg, sourceEmbedded, nil
		}

		// An incomplete configuration is in force while the next sources
		// are tried: its trusted roots among others.
		partial = cfg
	}

	m.setPhase(PhaseAcquiringConfig, nil)
	m.log.Info("downloading config", zap.Int("boot", b.num), zap.String("platform", sourceMetal))

	data, err := metalurl.Configuration(ctx, m.cfg.ConfigURL, b.cosi, metalurl.Options{
		Roots:          m.rootsWith(partial),
		Timeout:        m.cfg.DownloadTimeout,
		AttemptTimeout: m.cfg.DownloadAttemptTimeout,
		Logger:         m.log.With(zap.Int("boot", b.num)),
	})
	if errors.Is(err, metalurl.ErrNoConfigSource) {
		return nil, "", nil
	}

	if err != nil {
		return nil, "", fmt.Errorf("error acquiring via platform %s: %w", sourceMetal, err)
	}

	if http.DetectContentType(data) == "application/x-gzip" {
		if data, err = gunzip(data); err != nil {
			return nil, "", err
		}
	}

	m.log.Info(MsgFetchedConfig, zap.Int("boot", b.num), zap.Int("bytes", len(data)))

	cfg, err := configloader.NewFromBytes(data)
	if err != nil {
		return nil, "", fmt.Errorf("failed to load config via platform %s: %w", sourceMetal, err)
	}

	if err := validate(ctx, cfg, metalMode, nil, m.log); err != nil {
		return nil, "", fmt.Errorf("failed to validate config acquired via platform %s: %w", sourceMetal, err)
	}

	if err := validate(ctx, cfg, metalMode, b, m.log); err != nil {
		return nil, "", fmt.Errorf("failed to runtime validate config acquired via platform %s: %w", sourceMetal, err)
	}

	if !cfg.CompleteForBoot() {
		return nil, "", nil
	}

	return cfg, sourceMetal, nil
}

// validate runs the loader's validation (Validate, or with rt the runtime
// validation against the machine's resources), logging the warnings.
func validate(ctx context.Context, cfg talosconfig.Provider, mode runtimeMode, rt *bootRun, logger *zap.Logger) error {
	var (
		warnings []string
		err      error
	)

	if rt == nil {
		warnings, err = cfg.Validate(mode)
	} else {
		warnings, err = cfg.RuntimeValidate(ctx, rt.cosi, mode)
	}

	for _, w := range slices.Compact(warnings) {
		logger.Warn("config validation warning", zap.String("warning", w))
	}

	return err
}

// loadFromState reads the configuration STATE keeps; nil when it has none.
func (b *bootRun) loadFromState() (talosconfig.Provider, error) {
	data, err := os.ReadFile(filepath.Join(b.state.Data(), ConfigFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}

	if err != nil {
		return nil, fmt.Errorf("failed to stat %s: %w", ConfigFile, err)
	}

	cfg, err := configloader.NewFromBytes(data)
	if err != nil {
		return nil, fmt.Errorf("failed to load config from STATE: %w", err)
	}

	if err := validate(context.Background(), cfg, diskMode, nil, b.m.log); err != nil {
		return nil, fmt.Errorf("failed to validate on-disk config: %w", err)
	}

	return cfg, nil
}

func gunzip(data []byte) ([]byte, error) {
	r, err := gzip.NewReader(bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("error creating gzip reader: %w", err)
	}
	defer r.Close() //nolint:errcheck

	out, err := io.ReadAll(r)
	if err != nil {
		return nil, fmt.Errorf("error unzipping machine config: %w", err)
	}

	return out, nil
}
