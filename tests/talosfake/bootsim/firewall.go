package bootsim

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/siderolabs/talos/pkg/machinery/config/config"
	"github.com/siderolabs/talos/pkg/machinery/nethelpers"
	"go.uber.org/zap"
)

// firewall is the ingress filter Talos builds from NetworkDefaultActionConfig
// and NetworkRuleConfig documents
// (network/nftables_chain_config.go buildIngressChain): traffic from the
// machine itself (the loopback interface) is always accepted; with the
// default action block, a new connection is accepted only when a rule
// covers its port and protocol and its source is in the rule's subnets
// (and not in its except subnets); with accept, a rule drops connections
// to its ports from sources outside its subnets.
type firewall struct {
	block bool
	rules []config.NetworkRule
	// own are the machine's addresses: traffic between them goes through
	// the loopback interface.
	own []netip.Addr
}

func firewallOf(cfg config.Config, own ...netip.Addr) *firewall {
	fw := &firewall{own: own}

	if cfg == nil || cfg.NetworkRules() == nil {
		return fw
	}

	fw.block = cfg.NetworkRules().DefaultAction() == nethelpers.DefaultActionBlock
	fw.rules = cfg.NetworkRules().Rules()

	return fw
}

// allows reports whether a TCP connection from src to port gets through.
func (fw *firewall) allows(src netip.Addr, port uint16) bool {
	src = src.Unmap()

	if slices.Contains(fw.own, src) {
		return true
	}

	for _, r := range fw.rules {
		if r.Protocol() != nethelpers.ProtocolTCP || !inRanges(port, r.PortRanges()) {
			continue
		}

		matched := inSubnets(src, r.Subnets()) && !inSubnets(src, r.ExceptSubnets())

		switch {
		case fw.block && matched:
			return true
		case !fw.block && !matched:
			return false
		}
	}

	return !fw.block
}

func inRanges(port uint16, ranges [][2]uint16) bool {
	for _, r := range ranges {
		if port >= r[0] && port <= r[1] {
			return true
		}
	}

	return false
}

func inSubnets(addr netip.Addr, subnets []netip.Prefix) bool {
	for _, s := range subnets {
		if s.Contains(addr) {
			return true
		}
	}

	return false
}

// guardedListener is a service's socket on all the machine's addresses
// (Talos listens on the wildcard address) behind the firewall: it listens
// on 127.0.0.1 and on the machine's address; a connection the firewall
// drops is held open and never answered, as a dropped SYN leaves the
// client waiting until its own timeout.
type guardedListener struct {
	port   uint16
	log    *zap.Logger
	inner  []net.Listener
	conns  chan net.Conn
	closed chan struct{}
	once   sync.Once
	fw     atomic.Pointer[firewall]

	// mu guards held.
	mu   sync.Mutex
	held map[net.Conn]struct{}
}

// listenGuarded listens on port on 127.0.0.1 and addr (unless it is
// 127.0.0.1 or invalid).
func listenGuarded(addr netip.Addr, port int, fw *firewall, log *zap.Logger) (*guardedListener, error) {
	l := &guardedListener{
		port: uint16(port), log: log, //nolint:gosec // a port
		conns: make(chan net.Conn), closed: make(chan struct{}), held: map[net.Conn]struct{}{},
	}
	l.fw.Store(fw)

	addrs := []netip.Addr{netip.MustParseAddr("127.0.0.1")}
	if addr.IsValid() && addr != addrs[0] {
		addrs = append(addrs, addr)
	}

	for _, a := range addrs {
		inner, err := net.Listen("tcp", net.JoinHostPort(a.String(), strconv.Itoa(port)))
		if err != nil {
			l.Close() //nolint:errcheck

			return nil, err
		}

		l.inner = append(l.inner, inner)

		go l.acceptLoop(inner)
	}

	return l, nil
}

func (l *guardedListener) setFirewall(fw *firewall) { l.fw.Store(fw) }

func (l *guardedListener) acceptLoop(inner net.Listener) {
	for {
		c, err := inner.Accept()
		if err != nil {
			return
		}

		src, err := netip.ParseAddrPort(c.RemoteAddr().String())
		if err == nil && !l.fw.Load().allows(src.Addr(), l.port) {
			l.hold(c, src.Addr())

			continue
		}

		select {
		case l.conns <- c:
		case <-l.closed:
			c.Close() //nolint:errcheck

			return
		}
	}
}

// hold keeps a dropped connection open, unanswered, until the client
// gives up or the listener closes.
func (l *guardedListener) hold(c net.Conn, src netip.Addr) {
	l.log.Info("firewall dropped a connection", zap.Stringer("source", src), zap.Uint16("port", l.port))

	l.mu.Lock()
	l.held[c] = struct{}{}
	l.mu.Unlock()

	go func() {
		_, _ = io.Copy(io.Discard, c) //nolint:errcheck

		l.mu.Lock()
		delete(l.held, c)
		l.mu.Unlock()

		c.Close() //nolint:errcheck
	}()
}

// Accept implements net.Listener.
func (l *guardedListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

// Close implements net.Listener.
func (l *guardedListener) Close() error {
	var errs []error

	l.once.Do(func() {
		close(l.closed)

		for _, inner := range l.inner {
			errs = append(errs, inner.Close())
		}

		l.mu.Lock()
		for c := range l.held {
			c.Close() //nolint:errcheck
		}
		l.mu.Unlock()
	})

	return errors.Join(errs...)
}

// Addr implements net.Listener: the first address listened on.
func (l *guardedListener) Addr() net.Addr { return l.inner[0].Addr() }
