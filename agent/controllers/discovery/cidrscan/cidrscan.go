// Package cidrscan is the edge-only discovery.PeerSource: it proposes every
// address of a private CIDR that accepts a TCP connection on the Talos API
// port. It proves nothing about the host; the discovery Prober verifies each
// one with mutual TLS against the cluster's Talos CA.
package cidrscan

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"time"
)

// Scanner scans Prefix for open Port. The zero value is not usable: Prefix,
// Port, Concurrency and Timeout must be set.
type Scanner struct {
	// Prefix is the range scanned; its network and broadcast addresses
	// (IPv4) are skipped.
	Prefix netip.Prefix
	// Port is the Talos apid port, 50000.
	Port int
	// Concurrency bounds the connections in flight.
	Concurrency int
	// Timeout bounds each TCP connect: an address that does not answer
	// within it is dead for this round.
	Timeout time.Duration
	// Dial opens the connection; nil means a net.Dialer. Tests and the
	// benchmark replace it.
	Dial func(ctx context.Context, network, address string) (net.Conn, error)
}

// Peers implements discovery.PeerSource: it returns the addresses with the
// port open, in address order.
func (s *Scanner) Peers(ctx context.Context) ([]netip.Addr, error) {
	hosts := Hosts(s.Prefix)
	open := make([]bool, len(hosts))

	dial := s.Dial
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}

	var wg sync.WaitGroup

	sem := make(chan struct{}, max(s.Concurrency, 1))

	for i, addr := range hosts {
		select {
		case <-ctx.Done():
			wg.Wait()

			return nil, fmt.Errorf("scanning %s: %w", s.Prefix, ctx.Err())
		case sem <- struct{}{}:
		}

		wg.Add(1)

		go func() {
			defer func() { <-sem; wg.Done() }()

			cctx, cancel := context.WithTimeout(ctx, s.Timeout)
			defer cancel()

			conn, err := dial(cctx, "tcp", net.JoinHostPort(addr.String(), strconv.Itoa(s.Port)))
			if err != nil {
				return
			}

			conn.Close() //nolint:errcheck

			open[i] = true
		}()
	}

	wg.Wait()

	var out []netip.Addr

	for i, ok := range open {
		if ok {
			out = append(out, hosts[i])
		}
	}

	return out, nil
}

// Hosts returns the addresses of p that can be hosts: for IPv4 prefixes
// shorter than /31 the network and broadcast addresses are left out.
func Hosts(p netip.Prefix) []netip.Addr {
	p = p.Masked()

	var out []netip.Addr

	for a := p.Addr(); a.IsValid() && p.Contains(a); a = a.Next() {
		out = append(out, a)
	}

	if p.Addr().Is4() && p.Bits() < 31 && len(out) >= 2 {
		out = out[1 : len(out)-1]
	}

	return out
}
