package kms

import (
	"context"
	"net"
	"net/netip"
	"slices"
	"strings"

	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
)

// forwardedHeader is the gRPC metadata key proxies set.
const forwardedHeader = "x-forwarded-for"

// source is where a call came from.
type source struct {
	// Addr is the client's address: the peer's, or, when the peer is a
	// trusted proxy, the right-most untrusted address it forwarded.
	Addr netip.Addr
	// Peer is the TCP peer.
	Peer netip.Addr
	// IgnoredHeader is set when an untrusted peer sent a forwarding header.
	IgnoredHeader bool
}

func (s source) String() string {
	if s.Addr != s.Peer && s.Peer.IsValid() {
		return s.Addr.String() + " via " + s.Peer.String()
	}
	return s.Addr.String()
}

// callSource resolves the source of a call. A forwarding header is believed
// only from a trusted proxy, and then read from the right: the first
// address that is not itself a trusted proxy is the client (the left-most
// entries are whatever the client chose to write).
func callSource(ctx context.Context, trusted []netip.Prefix) source {
	var s source
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		if ap, err := netip.ParseAddrPort(p.Addr.String()); err == nil {
			s.Peer = ap.Addr().Unmap()
		} else if host, _, err := net.SplitHostPort(p.Addr.String()); err == nil {
			s.Peer, _ = netip.ParseAddr(host)
		}
	}
	s.Addr = s.Peer
	md, _ := metadata.FromIncomingContext(ctx)
	hops := forwarded(md.Get(forwardedHeader))
	if len(hops) == 0 {
		return s
	}
	if !isTrusted(s.Peer, trusted) {
		s.IgnoredHeader = true
		return s
	}
	for _, h := range slices.Backward(hops) {
		s.Addr = h
		if !isTrusted(h, trusted) {
			break
		}
	}
	return s
}

// forwarded parses X-Forwarded-For values; an unparsable hop ends the list
// at the hops to its right, which is all a proxy can vouch for.
func forwarded(values []string) []netip.Addr {
	var raw []string
	for _, v := range values {
		raw = append(raw, strings.Split(v, ",")...)
	}
	var out []netip.Addr
	for i := len(raw) - 1; i >= 0; i-- {
		a, err := netip.ParseAddr(strings.TrimSpace(raw[i]))
		if err != nil {
			break
		}
		out = append(out, a.Unmap())
	}
	slices.Reverse(out)
	return out
}

func isTrusted(a netip.Addr, trusted []netip.Prefix) bool {
	if !a.IsValid() {
		return false
	}
	for _, p := range trusted {
		if p.Contains(a) {
			return true
		}
	}
	return false
}
