// Package bootconfig is sovrad's boot server: it serves the enrollment
// configuration (package machineconfig) over HTTPS at a URL that Talos's
// talos.config= kernel argument names, with the machine's UUID in the
// query (talos.config=https://HOST:PORT/boot/config?uuid=${uuid}: Talos
// substitutes variables only in query values, see
// internal/app/machined/pkg/runtime/v1alpha1/platform/metal/url/url.go).
//
// The configuration holds no secret of any cluster, so anyone may fetch
// it. A fetch that names a UUID no record holds admits that machine's first
// Seals (kms.Service.Expect): a pending record bound to the fetching
// address. Every fetch is rate-limited per source and logged; bad input is
// answered with a clear error and changes nothing.
package bootconfig

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/time/rate"

	"github.com/sovra-dev/sovra/daemon/kms"
	"github.com/sovra-dev/sovra/daemon/machineconfig"
	"github.com/sovra-dev/sovra/daemon/metrics"
	"github.com/sovra-dev/sovra/daemon/ratelimit"
)

// Path is where the enrollment configuration is served; UUIDParam names
// the machine.
const (
	Path      = "/boot/config"
	UUIDParam = "uuid"
)

const (
	// DefaultRatePerIP is how many fetches a second one source may make
	// (burst: burstSeconds of it). Talos retries a failed fetch with an
	// exponential backoff from one second.
	DefaultRatePerIP = 1
	burstSeconds     = 5
	// globalRate bounds every source together.
	globalRate  = 200
	globalBurst = 400
	// fetchTimeout bounds one fetch (the config is built per request).
	fetchTimeout = 30 * time.Second
	// readHeaderTimeout and idleTimeout bound slow and idle clients.
	readHeaderTimeout = 10 * time.Second
	idleTimeout       = time.Minute
	// maxHeaderBytes bounds a request's headers.
	maxHeaderBytes = 16 << 10
	contentType    = "application/yaml"
)

// Expecter admits a new machine's first Seals: *kms.Service.
type Expecter interface {
	Expect(ctx context.Context, uuid string, src netip.Addr, window time.Duration, maxPending int) (kms.Expectation, error)
}

// Config configures the boot server.
type Config struct {
	// Listen is the HTTPS address.
	Listen string
	// TLS is the serving configuration (the node API's certificate, or one
	// Talos's built-in roots verify).
	TLS *tls.Config
	// Daemon is what the enrollment configuration points the machine at.
	Daemon machineconfig.Daemon
	// RatePerIP bounds the fetches of one source, a second; zero means
	// DefaultRatePerIP.
	RatePerIP float64
	// Window is how long a new machine may Seal; zero means
	// kms.DefaultBootConfigWindow. MaxPending bounds the pending machines;
	// zero means kms.DefaultMaxPending.
	Window     time.Duration
	MaxPending int
}

// Validate reports every problem of c at once.
func (c Config) Validate() error {
	var errs []error
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		errs = append(errs, fmt.Errorf("boot server address %q: want host:port: %w", c.Listen, err))
	}
	if c.TLS == nil {
		errs = append(errs, errors.New("the boot server needs a TLS configuration: it never serves plaintext"))
	}
	if err := c.Daemon.Validate(); err != nil {
		errs = append(errs, err)
	}
	if c.RatePerIP < 0 || c.Window < 0 || c.MaxPending < 0 {
		errs = append(errs, errors.New("the boot server's rate, window and pending bound must not be negative"))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("invalid boot server config: %w", err)
	}
	return nil
}

// Server serves the enrollment configuration.
type Server struct {
	cfg      Config
	keys     Expecter
	enroller machineconfig.Enroller
	limits   *ratelimit.Keyed
	now      func() time.Time
	logger   *zap.Logger
}

// New returns a boot server. keys may be nil (the KMS is off): the
// configuration is served, and no machine's first Seal is admitted.
func New(cfg Config, keys Expecter, logger *zap.Logger) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.RatePerIP == 0 {
		cfg.RatePerIP = DefaultRatePerIP
	}
	if logger == nil {
		logger = zap.NewNop()
	}
	burst := max(1, int(cfg.RatePerIP*burstSeconds))
	return &Server{
		cfg: cfg, keys: keys, now: time.Now, logger: logger,
		limits: ratelimit.New(rate.Limit(cfg.RatePerIP), burst, globalRate, globalBurst),
	}, nil
}

// URL is the talos.config= value for a server reachable at host:port.
func URL(hostport string) string {
	u := url.URL{Scheme: "https", Host: hostport, Path: Path, RawQuery: UUIDParam + "=${uuid}"}
	return u.String()
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	src := sourceOf(r)
	switch {
	case r.URL.Path != Path:
		http.Error(w, "not found: the enrollment configuration is at "+Path+"?"+UUIDParam+"=UUID", http.StatusNotFound)
		return
	case r.Method != http.MethodGet && r.Method != http.MethodHead:
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed: use GET", http.StatusMethodNotAllowed)
		return
	case !s.limits.Allow(ratelimit.SourceKey(src), s.now()):
		metrics.BootConfigFetches.WithLabelValues("RateLimited").Inc()
		w.Header().Set("Retry-After", "1")
		http.Error(w, "too many requests from this address: retry later", http.StatusTooManyRequests)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), fetchTimeout)
	defer cancel()
	uuid := r.URL.Query().Get(UUIDParam)
	outcome := "NoUUID"
	switch {
	case uuid == "" || uuid == "${uuid}":
		uuid = ""
	case s.keys == nil:
		outcome = "KMSOff"
	default:
		exp, err := s.keys.Expect(ctx, uuid, src, s.cfg.Window, s.cfg.MaxPending)
		switch {
		case errors.Is(err, kms.ErrInvalidUUID):
			metrics.BootConfigFetches.WithLabelValues("BadRequest").Inc()
			http.Error(w, "bad request: "+UUIDParam+" is not a machine UUID (hex digits and dashes)", http.StatusBadRequest)
			return
		case err != nil:
			metrics.BootConfigFetches.WithLabelValues("Unavailable").Inc()
			s.logger.Error("enrollment configuration not served: recording the machine failed", zap.Stringer("source", src), zap.Error(err))
			http.Error(w, "the daemon could not record the machine: retry later", http.StatusServiceUnavailable)
			return
		}
		outcome = string(exp)
	}
	body, err := s.enroller.Config(s.cfg.Daemon, s.now())
	if err != nil {
		s.logger.Error("enrollment configuration not served", zap.Stringer("source", src), zap.Error(err))
		http.Error(w, "the daemon could not build the enrollment configuration: retry later", http.StatusServiceUnavailable)
		return
	}
	metrics.BootConfigFetches.WithLabelValues(outcome).Inc()
	s.logger.Info("enrollment configuration served", zap.String("node_uuid", uuid), zap.Stringer("source", src), zap.String("sealing", outcome))
	w.Header().Set("Content-Type", contentType)
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		_, _ = w.Write(body)
	}
}

// sourceOf is the peer address of r: no forwarding header is believed.
func sourceOf(r *http.Request) netip.Addr {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}

// Serve serves on lis until ctx ends.
func (s *Server) Serve(ctx context.Context, lis net.Listener) error {
	// Failed handshakes (scanners, probes) are logged at debug level.
	errLog, err := zap.NewStdLogAt(s.logger.Named("http"), zapcore.DebugLevel)
	if err != nil {
		return fmt.Errorf("serving the enrollment configuration: %w", err)
	}
	srv := &http.Server{
		Handler: s, TLSConfig: s.cfg.TLS, ReadHeaderTimeout: readHeaderTimeout, IdleTimeout: idleTimeout,
		MaxHeaderBytes: maxHeaderBytes, ErrorLog: errLog,
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.ServeTLS(lis, "", "") }()
	select {
	case err := <-errc:
		return fmt.Errorf("serving the enrollment configuration: %w", err)
	case <-ctx.Done():
		shut, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(shut)
		return nil
	}
}
