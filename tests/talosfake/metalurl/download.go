package metalurl

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"time"

	"github.com/cosi-project/runtime/pkg/state"
	"github.com/siderolabs/go-retry/retry"
	"github.com/siderolabs/talos/pkg/machinery/constants"
	"go.uber.org/zap"
)

// Timings of pkg/download and the metal platform (constants.ConfigLoad*).
const (
	retryUnit   = time.Second
	retryJitter = time.Second
	// errorBodyLimit is how much of a failed answer's body is reported.
	errorBodyLimit = 32
)

// ErrNoConfigSource means talos.config= is absent or "none": the platform
// has no configuration to offer.
var ErrNoConfigSource = errors.New("no config source")

// Options tune a download; the zero value is Talos's.
type Options struct {
	// Roots verify HTTPS servers: the machine's trusted roots (the
	// built-in bundle and the TrustedRootsConfig of a configuration already
	// applied). nil means the system's.
	Roots *x509.CertPool
	// Timeout bounds all attempts; zero means constants.ConfigLoadTimeout
	// (3 h).
	Timeout time.Duration
	// AttemptTimeout bounds one attempt, half of it for the URL's
	// variables; zero means constants.ConfigLoadAttemptTimeout (3 min).
	AttemptTimeout time.Duration
	// Logger gets the line Talos logs per fetch.
	Logger *zap.Logger
}

func (o Options) withDefaults() Options {
	if o.Timeout == 0 {
		o.Timeout = constants.ConfigLoadTimeout
	}

	if o.AttemptTimeout == 0 {
		o.AttemptTimeout = constants.ConfigLoadAttemptTimeout
	}

	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}

	return o
}

// Configuration fetches the machine configuration named by the value of
// the talos.config= kernel argument, as the metal platform does: the URL's
// variables are filled from st before each attempt.
func Configuration(ctx context.Context, option string, st state.State, opts Options) ([]byte, error) {
	if option == "" || option == constants.ConfigNone {
		return nil, ErrNoConfigSource
	}

	if option == constants.MetalConfigISOLabel {
		return nil, errors.New("talos.config=metal-iso is not simulated")
	}

	opts = opts.withDefaults()

	endpoint := func(ctx context.Context) (string, error) {
		ctx, cancel := context.WithTimeout(ctx, opts.AttemptTimeout/2)
		defer cancel()

		u, err := Populate(ctx, option, st, opts.Logger)
		if err != nil {
			opts.Logger.Warn("failed to populate talos.config fetch URL", zap.String("url", option), zap.Error(err))
		}

		opts.Logger.Info("fetching machine config", zap.String("url", u))

		return u, nil
	}

	return Download(ctx, option, endpoint, opts)
}

// Download fetches a configuration from the URL endpoint returns for each
// attempt (source names it in errors), retrying transport errors and answers
// other than 200 exponentially (1 s units, 1 s jitter) within
// opts.Timeout, opts.AttemptTimeout per attempt. A 204 answer succeeds with
// no data, as in Talos.
func Download(ctx context.Context, source string, endpoint func(context.Context) (string, error), opts Options) ([]byte, error) {
	opts = opts.withDefaults()

	var data []byte

	err := retry.Exponential(opts.Timeout,
		retry.WithUnits(retryUnit),
		retry.WithJitter(retryJitter),
		retry.WithErrorLogging(true),
		retry.WithAttemptTimeout(opts.AttemptTimeout),
	).RetryWithContext(ctx, func(ctx context.Context) error {
		target, err := endpoint(ctx)
		if err != nil {
			return err
		}

		if data, err = fetch(ctx, target, opts.Roots); err != nil {
			return fmt.Errorf("failed to download config from %q: %w", source, err)
		}

		return nil
	})
	if err != nil {
		return nil, err
	}

	return data, nil
}

// fetch is one attempt (download.go's inner function and download()).
func fetch(ctx context.Context, target string, roots *x509.CertPool) ([]byte, error) {
	u, err := url.Parse(target)
	if err != nil {
		return nil, err
	}

	if u.Scheme == "file" {
		return os.ReadFile(u.Path)
	}

	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}

	client := &http.Client{Transport: transport(roots)}

	resp, err := client.Do(req)
	if err != nil {
		return nil, retry.ExpectedError(err)
	}
	defer resp.Body.Close() //nolint:errcheck

	if resp.StatusCode == http.StatusNoContent {
		return nil, nil
	}

	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, errorBodyLimit)) //nolint:errcheck // the status is the error
		body = bytes.ToValidUTF8(body, nil)

		return nil, retry.ExpectedErrorf("failed to download config, status code %d, body %q", resp.StatusCode, string(body))
	}

	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, retry.ExpectedErrorf("read config: %s", err.Error())
	}

	return data, nil
}

// transport is cleanhttp.DefaultTransport patched by httpdefaults: no
// keep-alives, the proxy from the environment, the machine's roots.
func transport(roots *x509.CertPool) *http.Transport {
	return &http.Transport{
		Proxy: http.ProxyFromEnvironment,
		DialContext: (&net.Dialer{
			Timeout:   30 * time.Second,
			KeepAlive: 30 * time.Second,
		}).DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          100,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
		DisableKeepAlives:     true,
		MaxIdleConnsPerHost:   -1,
		TLSClientConfig:       &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12},
	}
}
