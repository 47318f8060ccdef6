// Package connlimit bounds the connections that sovrad's node API and KMS
// listeners hold for callers that have not authenticated (Talos calls the
// KMS without credentials, on a fresh TLS connection per call). A Limiter
// caps the connections held at a time from one source (an IPv4 address, or
// an IPv6 /64, which one host usually holds whole) and in total, over every
// listener it wraps: a connection over either cap is closed as soon as it is
// accepted, before a byte of it is read, so a flood from one source neither
// exhausts the daemon's file descriptors nor crowds out other nodes.
// Refusals are logged at most once per source (and once for the total cap)
// per LogEvery. Exempt sources (trusted proxies, which carry many nodes'
// calls) are bounded by the total cap only.
//
// The package also holds the gRPC server settings both listeners share:
// how long a connection may take to finish its TLS and HTTP/2 handshakes,
// and how long it may idle.
package connlimit

import (
	"net"
	"net/netip"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.org/x/time/rate"
	"google.golang.org/grpc/keepalive"

	"github.com/sovra-dev/sovra/daemon/metrics"
	"github.com/sovra-dev/sovra/daemon/ratelimit"
)

// Handshake and keepalive settings of the gRPC servers behind a Limiter.
const (
	// HandshakeTimeout bounds a new connection's TLS and HTTP/2 handshakes
	// (gRPC's grpc.ConnectionTimeout; its default is 120 s). Talos gives a
	// whole KMS call 10 s, so an honest caller finishes well within it.
	HandshakeTimeout = 5 * time.Second
	// MaxConnectionIdle closes a connection that has had no call in flight
	// for this long; a client that comes back dials again.
	MaxConnectionIdle = 2 * time.Minute
	// pingAfter is how long a connection may be silent before the server
	// pings it; pingTimeout how long the ping may go unanswered before the
	// connection is closed (a peer that vanished).
	pingAfter   = time.Minute
	pingTimeout = 20 * time.Second
	// minClientPing is the shortest keepalive interval a client may use;
	// a client that pings more often is disconnected.
	minClientPing = 10 * time.Second

	// DefaultLogEvery is the shortest time between two log lines about one
	// source's refused connections.
	DefaultLogEvery = time.Minute
	// ipv6SourceBits is the prefix that makes one IPv6 source: a /64 is
	// what one host or one customer is usually given.
	ipv6SourceBits = 64
	// totalKey is the log limiter's key of refusals over the total cap.
	totalKey = "total"
	// The caps, as the limit label of the refusals' metric.
	limitPerSource = "per_source"
	limitTotal     = "total"
)

// Keepalive are the server's keepalive parameters: idle connections are
// closed after MaxConnectionIdle, silent ones are pinged and closed when
// the ping goes unanswered.
var Keepalive = keepalive.ServerParameters{
	MaxConnectionIdle: MaxConnectionIdle,
	Time:              pingAfter,
	Timeout:           pingTimeout,
}

// KeepalivePolicy is the keepalive enforcement policy: clients may ping no
// more often than every 10 s, and only with a call in flight.
var KeepalivePolicy = keepalive.EnforcementPolicy{MinTime: minClientPing}

// Config configures a Limiter. The zero value has no caps.
type Config struct {
	// PerSource caps the connections held at a time from one source; zero
	// means no cap.
	PerSource int
	// Total caps the connections held at a time over every wrapped
	// listener; zero means no cap.
	Total int
	// Exempt are the networks whose connections are not counted against
	// PerSource (trusted proxies); Total still bounds them.
	Exempt []netip.Prefix
	// LogEvery is the shortest time between two log lines about one
	// source's refusals; zero means DefaultLogEvery.
	LogEvery time.Duration
}

// Limiter counts the connections held through the listeners it wraps. It
// is safe for concurrent use.
type Limiter struct {
	cfg    Config
	logs   *ratelimit.Keyed
	logger *zap.Logger
	now    func() time.Time

	mu       sync.Mutex // guards total and bySource
	total    int
	bySource map[netip.Prefix]int
}

// New returns a Limiter with cfg; a nil logger discards.
func New(cfg Config, logger *zap.Logger) *Limiter {
	if logger == nil {
		logger = zap.NewNop()
	}
	if cfg.LogEvery <= 0 {
		cfg.LogEvery = DefaultLogEvery
	}
	return &Limiter{
		cfg:      cfg,
		logs:     ratelimit.New(rate.Every(cfg.LogEvery), 1, 0, 0),
		logger:   logger,
		now:      time.Now,
		bySource: map[netip.Prefix]int{},
	}
}

// Wrap returns lis with its accepted connections counted and capped; name
// (such as "node API") tells the listeners apart in the log.
func (l *Limiter) Wrap(lis net.Listener, name string) net.Listener {
	for _, limit := range []string{limitPerSource, limitTotal} {
		metrics.ConnectionsRefused.WithLabelValues(name, limit) // at zero from the start
	}
	return &listener{Listener: lis, limiter: l, name: name}
}

// Held returns the connections held now, in total.
func (l *Limiter) Held() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.total
}

// Source returns the source addr is counted as: its address for IPv4, its
// /64 for IPv6; the zero Prefix when addr is not an IP address.
func Source(addr net.Addr) netip.Prefix {
	ap, err := netip.ParseAddrPort(addr.String())
	if err != nil {
		return netip.Prefix{}
	}
	ip := ap.Addr().Unmap().WithZone("")
	bits := ip.BitLen()
	if ip.Is6() {
		bits = ipv6SourceBits
	}
	p, _ := ip.Prefix(bits)
	return p
}

// admit counts a new connection from src, or reports which cap refuses it.
func (l *Limiter) admit(src netip.Prefix) (ok, overTotal bool, held int) {
	exempt := l.exempt(src)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cfg.Total > 0 && l.total >= l.cfg.Total {
		return false, true, l.total
	}
	if !exempt && l.cfg.PerSource > 0 && l.bySource[src] >= l.cfg.PerSource {
		return false, false, l.bySource[src]
	}
	l.total++
	metrics.ConnectionsHeld.Inc()
	if !exempt {
		l.bySource[src]++
	}
	return true, false, 0
}

// release uncounts a connection from src.
func (l *Limiter) release(src netip.Prefix) {
	exempt := l.exempt(src)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.total--
	metrics.ConnectionsHeld.Dec()
	if exempt {
		return
	}
	if l.bySource[src]--; l.bySource[src] <= 0 {
		delete(l.bySource, src)
	}
}

func (l *Limiter) exempt(src netip.Prefix) bool {
	for _, p := range l.cfg.Exempt {
		if src.IsValid() && p.Contains(src.Addr()) {
			return true
		}
	}
	return false
}

// refused counts a refusal and logs it, at most once per source (or once
// for the total cap) per LogEvery.
func (l *Limiter) refused(name string, src netip.Prefix, overTotal bool, held int) {
	key, msg, limit, over := src.String(), "connections refused: this source holds the most allowed (--node-max-conns-per-ip)", l.cfg.PerSource, limitPerSource
	if overTotal {
		key, msg, limit, over = totalKey, "connections refused: the daemon holds the most allowed (--node-max-conns)", l.cfg.Total, limitTotal
	}
	metrics.ConnectionsRefused.WithLabelValues(name, over).Inc()
	if !l.logs.Allow(key, l.now()) {
		return
	}
	l.logger.Warn(msg,
		zap.String("listener", name),
		zap.String("source", src.String()),
		zap.Int("held", held),
		zap.Int("limit", limit),
		zap.Duration("logEvery", l.cfg.LogEvery))
}

// listener counts the connections it accepts.
type listener struct {
	net.Listener
	limiter *Limiter
	name    string
}

// Accept returns the next connection within the caps, closing at once
// every connection over them.
func (w *listener) Accept() (net.Conn, error) {
	for {
		c, err := w.Listener.Accept()
		if err != nil {
			return nil, err
		}
		src := Source(c.RemoteAddr())
		ok, overTotal, held := w.limiter.admit(src)
		if ok {
			return &conn{Conn: c, limiter: w.limiter, src: src}, nil
		}
		_ = c.Close()
		w.limiter.refused(w.name, src, overTotal, held)
	}
}

// conn uncounts itself when first closed.
type conn struct {
	net.Conn
	limiter *Limiter
	src     netip.Prefix
	once    sync.Once
}

func (c *conn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.limiter.release(c.src) })
	return err
}
