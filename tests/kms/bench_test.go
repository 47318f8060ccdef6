package kms

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	kmsapi "github.com/siderolabs/kms-client/api/kms"
	"google.golang.org/grpc/connectivity"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/internal/testutil"
)

const (
	// stormSize is the boot storm: this many nodes unseal at once.
	stormSize = 1000
	// probeCalls and probeConcurrency measure Unseal latency at a scale.
	probeCalls       = 200
	probeConcurrency = 8
	// setupWorkers create records and seal keys in parallel.
	setupWorkers = 16
	// stormRounds is how many times each server weathers the fresh storm.
	stormRounds = 3
)

// stats summarises one run of calls.
type stats struct {
	calls, failed int
	p50, p99, max time.Duration
	wall          time.Duration
}

func (s stats) throughput() float64 { return float64(s.calls-s.failed) / s.wall.Seconds() }

func (s stats) String() string {
	if s.wall == 0 {
		return fmt.Sprintf("%5d calls  p50 %8s  p99 %8s  max %8s", s.calls,
			s.p50.Round(time.Microsecond), s.p99.Round(time.Microsecond), s.max.Round(time.Microsecond))
	}
	return fmt.Sprintf("%5d calls %3d failed  p50 %8s  p99 %8s  max %8s  wall %8s  %8.0f unseals/s",
		s.calls, s.failed, s.p50.Round(10*time.Microsecond), s.p99.Round(10*time.Microsecond),
		s.max.Round(10*time.Microsecond), s.wall.Round(time.Millisecond), s.throughput())
}

func summarise(lat []time.Duration, failed int, wall time.Duration) stats {
	slices.Sort(lat)
	q := func(p float64) time.Duration {
		if len(lat) == 0 {
			return 0
		}
		return lat[min(len(lat)-1, int(p*float64(len(lat))))]
	}
	return stats{calls: len(lat), failed: failed, p50: q(0.50), p99: q(0.99), max: q(1), wall: wall}
}

// unsealer makes one Unseal the way Talos does (fresh connection, 10 s).
type unsealer func(ctx context.Context, uuid string, blob []byte) ([]byte, error)

// run makes the calls with the given concurrency (0: all at once, released
// together) and measures each from dial to answer.
func run(calls []sealed, concurrency int, u unsealer) stats {
	if concurrency == 0 {
		concurrency = len(calls)
	}
	lat := make([]time.Duration, len(calls))
	var failed sync.Map
	start := make(chan struct{})
	work := make(chan int, len(calls))
	for i := range calls {
		work <- i
	}
	close(work)
	var wg sync.WaitGroup
	for range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			for i := range work {
				t0 := time.Now()
				_, err := u(context.Background(), calls[i].node.UUID, calls[i].blob)
				lat[i] = time.Since(t0)
				if err != nil {
					failed.Store(i, err)
				}
			}
		}()
	}
	t0 := time.Now()
	close(start)
	wg.Wait()
	wall := time.Since(t0)
	n := 0
	failed.Range(func(any, any) bool { n++; return true })
	return summarise(lat, n, wall)
}

// parallel runs f(i) for i in [0, n) on setupWorkers goroutines.
func parallel(tb testing.TB, n int, f func(i int) error) {
	tb.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	work := make(chan int, n)
	for i := range n {
		work <- i
	}
	close(work)
	for range setupWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				if err := f(i); err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		tb.Fatal(err)
	}
}

// enrollAndSeal creates n attested nodes and seals a key for each.
func enrollAndSeal(tb testing.TB, d *kmsDaemon, n int) []sealed {
	tb.Helper()
	ctx := context.Background()
	out := make([]sealed, n)
	parallel(tb, n, func(i int) error {
		nd := newNode(tb)
		if err := d.createNode(ctx, nd, attestedNode); err != nil {
			return err
		}
		k := key(tb)
		var blob []byte
		var err error
		for range 100 { // the cache sees the new record within milliseconds
			if blob, err = d.Seal(ctx, nd.UUID, k); err == nil {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if err != nil {
			return fmt.Errorf("sealing for %s: %w", nd.Name, err)
		}
		out[i] = sealed{node: nd, key: k, blob: blob}
		return nil
	})
	return out
}

// fill adds enrolled records (no keys) until the datastore holds total.
func fill(tb testing.TB, d *kmsDaemon, have, total int) {
	tb.Helper()
	ctx := context.Background()
	parallel(tb, total-have, func(int) error {
		nd := newNode(tb)
		return d.kube.Create(ctx, &v1alpha1.SovraNode{
			ObjectMeta: metav1.ObjectMeta{Name: nd.Name},
			Spec:       v1alpha1.SovraNodeSpec{EKHash: nd.EKHash, EKPublic: []byte("ek"), AKPublic: []byte("ak"), UUID: nd.UUID},
		})
	})
}

// refServer runs the upstream reference KMS server (kms-client's
// cmd/kms-server, built from the module) over TLS with sovrad's serving
// certificate, as its own process like sovrad, and seals n keys with it.
func refServer(tb testing.TB, d *kmsDaemon, n int) (*kmsDaemon, *os.Process, []sealed) {
	tb.Helper()
	testutil.Require(tb, "go")
	dir := tb.TempDir()
	bin := filepath.Join(dir, "kms-server")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/siderolabs/kms-client/cmd/kms-server").CombinedOutput(); err != nil {
		tb.Fatalf("building the reference server: %v\n%s", err, out)
	}
	keyPath := filepath.Join(dir, "key")
	if err := os.WriteFile(keyPath, key(tb), 0o600); err != nil {
		tb.Fatal(err)
	}
	addr := "127.0.0.1:" + strconv.Itoa(testutil.FreePort(tb))
	cmd := exec.Command(bin, "--kms-api-endpoint", addr, "--key-path", keyPath, "--tls-enable",
		"--tls-cert-path", filepath.Join(d.DataDir, "node-api.crt"), "--tls-key-path", filepath.Join(d.DataDir, "node-api.key"))
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	ref := *d
	ref.KMSAddr = addr
	for deadline := time.Now().Add(10 * time.Second); ; {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			tb.Fatal("the reference server did not listen")
		}
		time.Sleep(20 * time.Millisecond)
	}
	out := make([]sealed, n)
	var wg sync.WaitGroup
	for i := range n { // its Seal sleeps a second: all at once
		wg.Add(1)
		go func() {
			defer wg.Done()
			nd := newNode(tb)
			k := key(tb)
			blob, err := ref.Seal(context.Background(), nd.UUID, k)
			if err != nil {
				tb.Error(err)
			}
			out[i] = sealed{node: nd, key: k, blob: blob}
		}()
	}
	wg.Wait()
	return &ref, cmd.Process, out
}

// round is one storm against one server.
type round struct {
	stats, handler stats
	cpu            time.Duration // the server's CPU during the storm
}

// measure runs a storm against the server process pid; with d set, it also
// reads sovrad's handler times from its log.
func measure(tb testing.TB, pid int, d *kmsDaemon, storm func() stats) round {
	tb.Helper()
	var at int64
	if d != nil {
		at = logSize(tb, d)
	}
	c0 := cpu(tb, pid)
	r := round{stats: storm()}
	r.cpu = cpu(tb, pid) - c0
	if d != nil {
		r.handler = serverTimes(tb, d, at)
	}
	return r
}

// median is the round with the median wall time.
func median(rs []round) round {
	s := slices.Clone(rs)
	slices.SortFunc(s, func(a, b round) int { return int(a.stats.wall - b.stats.wall) })
	return s[len(s)/2]
}

func (s stats) short() string {
	return fmt.Sprintf("p50 %s p99 %s %.0f/s", s.p50.Round(time.Millisecond), s.p99.Round(time.Millisecond), s.throughput())
}

// logSize is the size of the daemon's log now.
func logSize(tb testing.TB, d *kmsDaemon) int64 {
	tb.Helper()
	st, err := os.Stat(d.Log)
	if err != nil {
		tb.Fatal(err)
	}
	return st.Size()
}

// serverTimes summarises the "took" of the Unseal decisions the daemon
// logged after offset: its own time per call, without network and TLS.
func serverTimes(tb testing.TB, d *kmsDaemon, offset int64) stats {
	tb.Helper()
	time.Sleep(500 * time.Millisecond) // the log is written as calls finish
	b, err := os.ReadFile(d.Log)
	if err != nil {
		tb.Fatal(err)
	}
	var lat []time.Duration
	for _, line := range bytes.Split(b[offset:], []byte("\n")) {
		var rec struct {
			Op   string  `json:"op"`
			Took float64 `json:"took"`
		}
		if json.Unmarshal(line, &rec) == nil && rec.Op == "Unseal" {
			lat = append(lat, time.Duration(rec.Took*float64(time.Second)))
		}
	}
	return summarise(lat, 0, 0)
}

// cpu is the user+system CPU time a process used so far.
func cpu(tb testing.TB, pid int) time.Duration {
	tb.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		tb.Fatal(err)
	}
	// Fields after the command name (which may hold spaces) start at ") ".
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	const ticks = 100 // USER_HZ
	return time.Duration(utime+stime) * time.Second / ticks
}

// established returns an unsealer over connections dialed (and their TLS
// handshakes done) before the clock starts, one per node: it measures the
// servers without the connection setup.
func established(tb testing.TB, k *kmsDaemon, calls []sealed) unsealer {
	tb.Helper()
	conns := map[string]kmsapi.KMSServiceClient{}
	for _, c := range calls {
		conn, err := k.dial()
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { conn.Close() })
		conn.Connect()
		ctx, cancel := context.WithTimeout(context.Background(), talosTimeout)
		for s := conn.GetState(); s != connectivity.Ready; s = conn.GetState() {
			if !conn.WaitForStateChange(ctx, s) {
				tb.Fatal("connection not ready")
			}
		}
		cancel()
		conns[c.node.UUID] = kmsapi.NewKMSServiceClient(conn)
	}
	return func(ctx context.Context, uuid string, blob []byte) ([]byte, error) {
		ctx, cancel := context.WithTimeout(ctx, talosTimeout)
		defer cancel()
		resp, err := conns[uuid].Unseal(ctx, &kmsapi.Request{NodeUuid: uuid, Data: blob})
		return resp.GetData(), err
	}
}

// BenchmarkBootStorm: 1000 concurrent Unseals over TLS with the upstream
// client, as Talos makes them, against sovrad on SQLite and against the
// upstream reference server (its own process too) in the same run; then
// Unseal latency at 10, 1000 and 10 000 enrolled nodes.
func BenchmarkBootStorm(b *testing.B) {
	d := startKMS(b)
	report := func(format string, a ...any) {
		fmt.Fprintf(os.Stdout, format+"\n", a...)
	}
	scales := map[int]round{}
	probe := func(set []sealed, enrolled int) {
		calls := make([]sealed, probeCalls)
		for i := range calls {
			calls[i] = set[i%len(set)]
		}
		r := measure(b, d.PID(), d, func() stats { return run(calls, probeConcurrency, d.Unseal) })
		scales[enrolled] = r
		if r.stats.failed > 0 {
			b.Fatalf("%d of the probe Unseals failed at %d nodes\n%s", r.stats.failed, enrolled, d.Tail(20))
		}
	}
	quiet := func() { time.Sleep(5 * time.Second) } // let background writes drain

	first := enrollAndSeal(b, d, 10)
	probe(first, 10)
	storm := append(first, enrollAndSeal(b, d, stormSize-len(first))...)
	probe(first, stormSize)
	ref, refProc, refCalls := refServer(b, d, stormSize)

	// Talos exactly: a fresh connection (TLS handshake) per call. The host
	// is shared, so the storms alternate for stormRounds rounds and the
	// median round (by wall time) of each server is reported.
	var refRounds, ourRounds []round
	for range stormRounds {
		quiet()
		refRounds = append(refRounds, measure(b, refProc.Pid, nil, func() stats { return run(refCalls, 0, ref.Unseal) }))
		quiet()
		ourRounds = append(ourRounds, measure(b, d.PID(), d, func() stats { return run(storm, 0, d.Unseal) }))
		if r := ourRounds[len(ourRounds)-1]; r.stats.failed > 0 {
			b.Fatalf("%d of %d Unseals failed in the storm\n%s", r.stats.failed, r.stats.calls, d.Tail(20))
		}
	}
	drainCPU := cpu(b, d.PID())
	time.Sleep(15 * time.Second) // the deferred audit writes of the last storm
	drainCPU = cpu(b, d.PID()) - drainCPU
	refFresh, ourFresh := median(refRounds), median(ourRounds)
	// The same storm over connections already established.
	refEst := run(refCalls, 0, established(b, ref, refCalls))
	quiet()
	ourEstUnseal := established(b, d, storm)
	logAt := logSize(b, d)
	ourEst := run(storm, 0, ourEstUnseal)
	ourEstServer := serverTimes(b, d, logAt)
	if ourEst.failed > 0 {
		b.Fatalf("%d of %d Unseals failed in the storm\n%s", ourEst.failed, ourEst.calls, d.Tail(20))
	}

	fill(b, d, stormSize, 10_000)
	quiet()
	quiet()
	probe(first, 10_000)

	report("boot storm: %d concurrent Unseals over TLS with the upstream kms-client; sovrad on SQLite; both servers are separate processes", stormSize)
	report("fresh connection per call, exactly as Talos (client and servers share this host's CPUs):")
	for i := range refRounds {
		report("  round %d: sovrad %s | reference %s", i+1, ourRounds[i].stats.short(), refRounds[i].stats.short())
	}
	report("  sovrad (median)   %s  server CPU %v/unseal in the storm (incl. TLS)", ourFresh.stats, (ourFresh.cpu / stormSize).Round(time.Microsecond))
	report("    sovrad handler time (from its decision log): %s", ourFresh.handler)
	report("    deferred audit writes after the storm: %v CPU/unseal (events, release times)", (drainCPU / stormSize).Round(time.Microsecond))
	report("  reference (median) %s  server CPU %v/unseal in the storm (incl. TLS)", refFresh.stats, (refFresh.cpu / stormSize).Round(time.Microsecond))
	report("  ratio sovrad/reference: throughput %.1fx, p99 %.2fx", ourFresh.stats.throughput()/refFresh.stats.throughput(), float64(ourFresh.stats.p99)/float64(refFresh.stats.p99))
	report("connections established before the clock starts (one per node):")
	report("  sovrad            %s", ourEst)
	report("    sovrad handler time (from its decision log): %s", ourEstServer)
	report("  reference server  %s", refEst)
	report("  ratio sovrad/reference: throughput %.1fx, p99 %.3fx", ourEst.throughput()/refEst.throughput(), float64(ourEst.p99)/float64(refEst.p99))
	report("unseal latency by enrolled nodes (%d calls, %d concurrent, fresh connections; handler = sovrad's own time per call):", probeCalls, probeConcurrency)
	for _, n := range []int{10, stormSize, 10_000} {
		report("  %6s nodes  client %s", strconv.Itoa(n), scales[n].stats)
		report("  %6s        handler %s", "", scales[n].handler)
	}
	b.ReportMetric(float64(ourFresh.stats.p50.Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(ourFresh.stats.p99.Microseconds())/1000, "p99-ms")
	b.ReportMetric(ourFresh.stats.throughput(), "unseals/s")
	b.ReportMetric(ourFresh.stats.throughput()/refFresh.stats.throughput(), "x-reference")
	b.ReportMetric(ourEst.throughput()/refEst.throughput(), "x-reference-established")
}
