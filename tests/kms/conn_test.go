package kms

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/agent/attest"
	"github.com/sovra-dev/sovra/daemon/connlimit"
	pb "github.com/sovra-dev/sovra/internal/nodeapi"
)

const (
	// defaultPerSource is sovrad's default --node-max-conns-per-ip.
	defaultPerSource = 32
	// attacker is the flood's source; nodes call from 127.0.0.1.
	attacker = "127.0.0.2"
	// floodConns connections that never send a ClientHello are opened at
	// an even pace over floodSpan (longer than one handshake deadline, so
	// the cap is seen freeing and filling again), each held by the attacker
	// until the daemon closes it.
	floodConns = 4000
	floodSpan  = 8 * time.Second
	// tlsIdleConns complete TLS and then send nothing.
	tlsIdleConns = 16
	// atOnce is how soon a connection over the cap must see its end.
	atOnce = time.Second
	// deadlineSlack is how late after the handshake deadline an idle
	// connection may still be closed.
	deadlineSlack = 2 * time.Second
	// fdSlack covers the daemon's own file descriptors that come and go
	// (the real calls' connections, the datastore's, the API server's).
	fdSlack = 40
	// nonceCalls are the GetNonce calls during the flood (a node may hold
	// 8 unused nonces).
	nonceCalls = 5
)

// connOutcome is what the daemon did with one idle connection.
type connOutcome struct {
	// closedAtOnce: the daemon closed it within atOnce.
	closedAtOnce bool
	// heldFor is how long it was kept when not closed at once; zero if it
	// was still open deadlineSlack after the handshake deadline.
	heldFor time.Duration
}

// idleConn dials addr from src, optionally completes TLS, then sends
// nothing and reports how long the daemon kept the connection.
func idleConn(addr, src string, tlsCfg *tls.Config) (connOutcome, error) {
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 10 * time.Second}
	start := time.Now()
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return connOutcome{}, err
	}
	defer c.Close()
	if tlsCfg != nil {
		tc := tls.Client(c, tlsCfg)
		if err := tc.Handshake(); err != nil {
			return connOutcome{}, err
		}
		c = tc
	}
	if closedBy(c, start.Add(atOnce)) {
		return connOutcome{closedAtOnce: true}, nil
	}
	if closedBy(c, start.Add(connlimit.HandshakeTimeout+deadlineSlack)) {
		return connOutcome{heldFor: time.Since(start)}, nil
	}
	return connOutcome{}, nil
}

// closedBy reads c until the daemon closes it (true) or deadline passes
// (false). A TLS connection may see the server's HTTP/2 settings first.
func closedBy(c net.Conn, deadline time.Time) bool {
	c.SetReadDeadline(deadline)
	buf := make([]byte, 512)
	for {
		_, err := c.Read(buf)
		var ne net.Error
		switch {
		case err == nil:
			continue
		case errors.As(err, &ne) && ne.Timeout():
			return false
		default:
			return true
		}
	}
}

// fdCount is the number of file descriptors pid holds.
func fdCount(t testing.TB, pid int) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// sampleFDs records the most file descriptors pid holds until stop is closed.
func sampleFDs(t testing.TB, pid int, stop <-chan struct{}) *atomic.Int64 {
	var most atomic.Int64
	go func() {
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			if ents, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/fd"); err == nil && int64(len(ents)) > most.Load() {
				most.Store(int64(len(ents)))
			}
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	}()
	return &most
}

// TestConnectionFlood: one source floods the node API (which the KMS
// shares) with thousands of TCP connections that never send a ClientHello,
// and some that complete TLS and idle. The daemon holds at most
// --node-max-conns-per-ip of them, closes the rest at once and the held
// ones at the handshake deadline, logs one line about it, and its file
// descriptors stay bounded; meanwhile a node's Unseal and an agent's
// attestation call from another address succeed within Talos's 10 s.
func TestConnectionFlood(t *testing.T) {
	k := startKMS(t)
	ctx := context.Background()
	n := newNode(t)
	if err := k.createNode(ctx, n, attestedNode); err != nil {
		t.Fatal(err)
	}
	secret := key(t)
	blob := k.sealEventually(ctx, n, secret)
	k.unsealEventually(ctx, n, blob)

	baseline := fdCount(t, k.PID())
	offset := logSize(t, k)
	stop := make(chan struct{})
	most := sampleFDs(t, k.PID(), stop)
	floodStart := time.Now()

	// The attacker's connections: TLS-and-idle ones first, then the flood.
	var (
		mu       sync.Mutex
		outcomes []connOutcome
		tlsOut   []connOutcome
		dialErrs int
	)
	tlsCfg := &tls.Config{RootCAs: k.roots, ServerName: "127.0.0.1", NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS12}
	var wg sync.WaitGroup
	for range tlsIdleConns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			o, err := idleConn(k.KMSAddr, attacker, tlsCfg)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				t.Errorf("completing TLS from %s: %v", attacker, err)
				return
			}
			tlsOut = append(tlsOut, o)
		}()
	}
	time.Sleep(200 * time.Millisecond) // the TLS ones hold their places
	floodDone := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(floodDone)
		pace := time.NewTicker(floodSpan / floodConns)
		defer pace.Stop()
		for range floodConns {
			<-pace.C
			wg.Add(1)
			go func() {
				defer wg.Done()
				o, err := idleConn(k.KMSAddr, attacker, nil)
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					dialErrs++
					return
				}
				outcomes = append(outcomes, o)
			}()
		}
	}()

	// A node boots while the flood runs: Unseal as Talos does (a fresh
	// TLS connection, 10 s), and the agent's attestation path (GetNonce).
	var unseals []time.Duration
	nonces := 0
	for done := false; !done; {
		select {
		case <-floodDone:
			done = true
		default:
		}
		start := time.Now()
		got, err := k.Unseal(ctx, n.UUID, blob)
		took := time.Since(start)
		if err != nil || !bytes.Equal(got, secret) {
			t.Fatalf("Unseal during the flood after %s: %v\n%s", took, err, k.Tail(20))
		}
		unseals = append(unseals, took)
		if nonces < nonceCalls {
			getNonce(t, k, n)
			nonces++
		}
		time.Sleep(200 * time.Millisecond)
	}
	wg.Wait()
	close(stop)

	slowest := slowestOf(unseals)
	t.Logf("flood of %d connections from %s in %s: %d Unseals during it, slowest %s; daemon fds %d before, %d at most",
		floodConns, attacker, time.Since(floodStart).Round(time.Millisecond), len(unseals), slowest.Round(time.Millisecond), baseline, most.Load())
	if slowest >= talosTimeout {
		t.Errorf("an Unseal took %s, Talos gives up after %s", slowest, talosTimeout)
	}
	if nonces < nonceCalls {
		t.Errorf("only %d GetNonce calls during the flood", nonces)
	}

	// The per-source cap: everything over it was closed at once; what was
	// held, was held for at most one handshake deadline each, and at most
	// the cap at a time (each deadline frees the places for the next).
	closedAtOnce, held := 0, 0
	for _, o := range append(outcomes, tlsOut...) {
		switch {
		case o.closedAtOnce:
			closedAtOnce++
		case o.heldFor == 0:
			t.Errorf("an idle connection was still open %s after the handshake deadline", deadlineSlack)
		default:
			held++
			if o.heldFor < connlimit.HandshakeTimeout-atOnce {
				t.Errorf("a held idle connection was closed after %s, before the handshake deadline", o.heldFor)
			}
		}
	}
	for _, o := range tlsOut {
		if o.closedAtOnce || o.heldFor == 0 {
			t.Errorf("a connection that completed TLS and idled: %+v; want closed at the handshake deadline", o)
		}
	}
	windows := int(floodSpan/connlimit.HandshakeTimeout) + 2
	t.Logf("%d closed at once, %d held until the handshake deadline, %d dials failed", closedAtOnce, held, dialErrs)
	if held > defaultPerSource*windows {
		t.Errorf("%d connections from one source held, want at most %d (the cap per handshake deadline)", held, defaultPerSource*windows)
	}
	if closedAtOnce < floodConns-defaultPerSource*windows {
		t.Errorf("only %d of %d connections over the cap closed at once", closedAtOnce, floodConns)
	}
	if dialErrs > 0 {
		t.Errorf("%d dials failed", dialErrs)
	}
	if grew := int(most.Load()) - baseline; grew > defaultPerSource+fdSlack {
		t.Errorf("the daemon's file descriptors grew by %d during the flood, want at most %d", grew, defaultPerSource+fdSlack)
	}

	// One log line about the source, not one per connection.
	logged := []byte(k.LogSince(offset))
	lines := bytes.Count(logged, []byte("connections refused: this source holds the most allowed"))
	if lines != 1 || !bytes.Contains(logged, []byte(`"source":"127.0.0.2/32"`)) || !bytes.Contains(logged, []byte(`"listener":"node API"`)) {
		t.Errorf("%d log lines about the refusals, want 1 naming %s on the node API\n%s", lines, attacker, k.Tail(20))
	}
	if bytes.Contains(logged, []byte(`"source":"127.0.0.1/32"`)) {
		t.Error("the node's address was refused")
	}
}

// getNonce asks for an attestation nonce as the agent does, on a fresh
// TLS connection with the agent's client.
func getNonce(t *testing.T, k *kmsDaemon, n node) {
	t.Helper()
	conn := agentConn(t, k.KMSAddr, k.roots, nil)
	ctx, cancel := context.WithTimeout(context.Background(), talosTimeout)
	defer cancel()
	start := time.Now()
	if _, err := attest.NewClient(conn).GetNonce(ctx, &pb.NonceRequest{Node: n.Name}); err != nil {
		t.Fatalf("GetNonce during the flood after %s: %v", time.Since(start), err)
	}
}

func slowestOf(ds []time.Duration) time.Duration {
	var m time.Duration
	for _, d := range ds {
		m = max(m, d)
	}
	return m
}

// TestConnectionCapOnKMSListener: on its own listener (--kms-listen) the
// KMS is bounded alike: over --node-max-conns-per-ip a source's
// connections are closed at once, the held ones at the handshake deadline,
// and a node on another address unseals meanwhile.
func TestConnectionCapOnKMSListener(t *testing.T) {
	const perSource, conns = 4, 12
	k := startKMSApart(t, "--node-max-conns-per-ip="+strconv.Itoa(perSource))
	ctx := context.Background()
	n := newNode(t)
	if err := k.createNode(ctx, n, attestedNode); err != nil {
		t.Fatal(err)
	}
	secret := key(t)
	blob := k.sealEventually(ctx, n, secret)
	offset := logSize(t, k)

	var mu sync.Mutex
	var outcomes []connOutcome
	var wg sync.WaitGroup
	for range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			o, err := idleConn(k.KMSAddr, attacker, nil)
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			outcomes = append(outcomes, o)
			mu.Unlock()
		}()
	}
	time.Sleep(200 * time.Millisecond)
	if got, err := k.Unseal(ctx, n.UUID, blob); err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("Unseal while a source holds its cap: %v", err)
	}
	wg.Wait()

	closedAtOnce, held := 0, 0
	for _, o := range outcomes {
		switch {
		case o.closedAtOnce:
			closedAtOnce++
		case o.heldFor == 0:
			t.Errorf("an idle connection was still open %s after the handshake deadline", deadlineSlack)
		default:
			held++
		}
	}
	if held != perSource || closedAtOnce != conns-perSource {
		t.Errorf("%d held and %d closed at once, want %d and %d", held, closedAtOnce, perSource, conns-perSource)
	}
	logged := []byte(k.LogSince(offset))
	if bytes.Count(logged, []byte("connections refused")) != 1 || !bytes.Contains(logged, []byte(`"listener":"KMS"`)) {
		t.Errorf("want one log line about the KMS listener's refusals\n%s", k.Tail(10))
	}
}
