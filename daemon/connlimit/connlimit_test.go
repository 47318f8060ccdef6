package connlimit

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"k8s.io/component-base/metrics/testutil"

	"github.com/sovra-dev/sovra/daemon/metrics"
)

const (
	// closedWithin is how soon a refused connection must see its end.
	closedWithin = 500 * time.Millisecond
	// settle bounds waits for the server to count a change.
	settle = 5 * time.Second
)

// serve accepts on a wrapped loopback listener, holding every accepted
// connection open until its client closes it.
func serve(t *testing.T, l *Limiter) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	wrapped := l.Wrap(lis, "test")
	t.Cleanup(func() { wrapped.Close() })
	go func() {
		for {
			c, err := wrapped.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(io.Discard, c)
			}()
		}
	}()
	return lis.Addr().String()
}

// dialFrom connects to addr from the local address from.
func dialFrom(t *testing.T, from, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// open reports whether the server keeps c open: a read sees no end within
// closedWithin.
func open(t *testing.T, c net.Conn) bool {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(closedWithin))
	_, err := c.Read(make([]byte, 1))
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	if err == nil {
		t.Fatal("the server sent data")
	}
	return false
}

func waitHeld(t *testing.T, l *Limiter, want int) {
	t.Helper()
	deadline := time.Now().Add(settle)
	for l.Held() != want {
		if time.Now().After(deadline) {
			t.Fatalf("held %d, want %d", l.Held(), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestPerSourceCap(t *testing.T) {
	core, logs := observer.New(zapcore.WarnLevel)
	l := New(Config{PerSource: 2, Total: 10}, zap.New(core))
	addr := serve(t, l)
	refusedBefore, _ := testutil.GetCounterMetricValue(metrics.ConnectionsRefused.WithLabelValues("test", limitPerSource))
	a1, a2 := dialFrom(t, "127.0.0.2", addr), dialFrom(t, "127.0.0.2", addr)
	waitHeld(t, l, 2)
	over := dialFrom(t, "127.0.0.2", addr)
	if open(t, over) {
		t.Fatal("a third connection from one source was kept")
	}
	if !open(t, a1) || !open(t, a2) {
		t.Fatal("a connection within the cap was closed")
	}
	// Another source is not affected.
	if !open(t, dialFrom(t, "127.0.0.3", addr)) {
		t.Fatal("another source was refused")
	}
	// A closed connection frees its place.
	a1.Close()
	waitHeld(t, l, 2)
	if !open(t, dialFrom(t, "127.0.0.2", addr)) {
		t.Fatal("the source was refused after one of its connections closed")
	}
	// More refusals log nothing more within LogEvery.
	for range 5 {
		if open(t, dialFrom(t, "127.0.0.2", addr)) {
			t.Fatal("a connection over the cap was kept")
		}
	}
	lines := logs.FilterMessageSnippet("--node-max-conns-per-ip").All()
	if len(lines) != 1 {
		t.Fatalf("%d log lines about refusals, want 1", len(lines))
	}
	// Every refusal is counted, logged or not. The client may see the close
	// a moment before the listener counts it.
	var refused float64
	for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		n, err := testutil.GetCounterMetricValue(metrics.ConnectionsRefused.WithLabelValues("test", limitPerSource))
		if err != nil {
			t.Fatal(err)
		}
		if refused = n - refusedBefore; refused >= 6 || time.Now().After(deadline) {
			break
		}
	}
	if refused != 6 {
		t.Fatalf("counted %v refusals, want 6", refused)
	}
	if got := lines[0].ContextMap()["source"]; got != "127.0.0.2/32" {
		t.Fatalf("logged source %v", got)
	}
}

func TestTotalCapAndExempt(t *testing.T) {
	core, logs := observer.New(zapcore.WarnLevel)
	proxy := netip.MustParsePrefix("127.0.0.4/32")
	l := New(Config{PerSource: 1, Total: 3, Exempt: []netip.Prefix{proxy}}, zap.New(core))
	addr := serve(t, l)
	// The proxy is not held to one connection.
	p1, p2 := dialFrom(t, "127.0.0.4", addr), dialFrom(t, "127.0.0.4", addr)
	if !open(t, p1) || !open(t, p2) {
		t.Fatal("a trusted proxy was held to the per-source cap")
	}
	dialFrom(t, "127.0.0.5", addr)
	waitHeld(t, l, 3)
	// The total bounds everyone, the proxy too.
	if open(t, dialFrom(t, "127.0.0.6", addr)) || open(t, dialFrom(t, "127.0.0.4", addr)) {
		t.Fatal("a connection over the total cap was kept")
	}
	if n := logs.FilterMessageSnippet("--node-max-conns)").Len(); n != 1 {
		t.Fatalf("%d log lines about the total cap, want 1", n)
	}
}

func TestNoCaps(t *testing.T) {
	l := New(Config{}, nil)
	addr := serve(t, l)
	for range 20 {
		dialFrom(t, "127.0.0.2", addr)
	}
	waitHeld(t, l, 20)
}

func TestSource(t *testing.T) {
	for addr, want := range map[string]string{
		"192.0.2.7:443":                  "192.0.2.7/32",
		"[::ffff:192.0.2.7]:443":         "192.0.2.7/32",
		"[2001:db8:1:2:3:4:5:6]:443":     "2001:db8:1:2::/64",
		"[2001:db8:1:2:ffff::1%eth0]:80": "2001:db8:1:2::/64",
	} {
		ap := netip.MustParseAddrPort(addr)
		if got := Source(net.TCPAddrFromAddrPort(ap)).String(); got != want {
			t.Errorf("Source(%s) = %s, want %s", addr, got, want)
		}
	}
	if Source(&net.UnixAddr{Name: "/x", Net: "unix"}).IsValid() {
		t.Error("a unix address has a source")
	}
}

// TestReleaseOnce: closing a connection twice frees one place only.
func TestReleaseOnce(t *testing.T) {
	l := New(Config{PerSource: 5}, nil)
	addr := serve(t, l)
	dialFrom(t, "127.0.0.2", addr)
	dialFrom(t, "127.0.0.2", addr)
	waitHeld(t, l, 2)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	w := l.Wrap(lis, "second")
	dialFrom(t, "127.0.0.2", lis.Addr().String()) // the kernel completes it
	c, err := w.Accept()
	if err != nil {
		t.Fatal(err)
	}
	waitHeld(t, l, 3)
	c.Close()
	c.Close()
	waitHeld(t, l, 2)
}
