package cidrscan_test

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/agent/controllers/discovery/cidrscan"
)

func TestHosts(t *testing.T) {
	for _, c := range []struct {
		prefix string
		n      int
	}{{"10.0.0.0/24", 254}, {"10.0.0.0/31", 2}, {"10.0.0.5/32", 1}, {"10.0.0.0/16", 65534}, {"fd00::/120", 256}} {
		if got := len(cidrscan.Hosts(netip.MustParsePrefix(c.prefix))); got != c.n {
			t.Errorf("%s: %d hosts, want %d", c.prefix, got, c.n)
		}
	}
}

func TestScanFindsOpenPorts(t *testing.T) {
	live := []netip.Addr{netip.MustParseAddr("10.9.0.3"), netip.MustParseAddr("10.9.0.77"), netip.MustParseAddr("10.9.0.254")}

	s := &cidrscan.Scanner{
		Prefix:      netip.MustParsePrefix("10.9.0.0/24"),
		Port:        50000,
		Concurrency: 16,
		Timeout:     50 * time.Millisecond,
		Dial: func(ctx context.Context, _, address string) (net.Conn, error) {
			ap := netip.MustParseAddrPort(address)
			if ap.Port() != 50000 {
				t.Errorf("dialled port %d", ap.Port())
			}

			if slices.Contains(live, ap.Addr()) {
				c1, c2 := net.Pipe()
				c2.Close()

				return c1, nil
			}

			<-ctx.Done()

			return nil, errors.New("timeout")
		},
	}

	start := time.Now()

	got, err := s.Peers(context.Background())
	if err != nil {
		t.Fatal(err)
	}

	if !slices.Equal(got, live) {
		t.Fatalf("peers = %v, want %v", got, live)
	}

	// 251 dead addresses, 16 at a time, 50ms each: about 16 waves.
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("scan took %s", d)
	}
}
