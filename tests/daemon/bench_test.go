package daemon_test

import (
	"fmt"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/tests/sovradtest"
)

const (
	// startSettle is when the RSS after start is sampled: the controllers
	// have synced their caches and installed the Cluster API's CRDs.
	startSettle = 10 * time.Second
	// idleSettle is when the idle RSS is sampled: Go has given back what
	// the start-up used (its scavenger returns free pages over minutes).
	idleSettle  = 2 * time.Minute
	getRequests = 100
)

// BenchmarkDaemon prints the daemon's start-to-ready time, its RSS ten
// seconds after ready and once idle, and the latency of `kubectl get` (the
// real kubectl process, as a user runs it) on the embedded SQLite default:
// the API server alone (--controllers none) and with every in-process
// controller (the default). Targets: ready ≤ 5 s, idle RSS ≤ 300 MB,
// kubectl get p50 ≤ 60 ms. Run with -benchtime 1x.
func BenchmarkDaemon(b *testing.B) {
	for _, controllers := range []string{"none", "all"} {
		b.Run("controllers="+controllers, func(b *testing.B) { benchDaemon(b, controllers) })
	}
}

func benchDaemon(b *testing.B, controllers string) {
	for i := 0; i < b.N; i++ {
		d := sovradtest.Start(b, filepath.Join(b.TempDir(), "data"), "--controllers", controllers)
		ready := d.ReadyAt.Sub(d.StartedAt)

		time.Sleep(startSettle)
		started, err := sovradtest.RSS(d.PID())
		if err != nil {
			b.Fatal(err)
		}
		time.Sleep(idleSettle - startSettle)
		rss, err := sovradtest.RSS(d.PID())
		if err != nil {
			b.Fatal(err)
		}

		d.Kubectl("get", "namespaces") // fills kubectl's discovery cache, as any first call does
		lat := make([]time.Duration, 0, getRequests)
		for j := 0; j < getRequests; j++ {
			start := time.Now()
			d.Kubectl("get", "namespaces")
			lat = append(lat, time.Since(start))
		}
		sort.Slice(lat, func(a, c int) bool { return lat[a] < lat[c] })
		p50, p99 := lat[len(lat)/2], lat[len(lat)*99/100]

		b.ReportMetric(ready.Seconds(), "ready-s")
		b.ReportMetric(float64(started)/(1<<20), "start-rss-MB")
		b.ReportMetric(float64(rss)/(1<<20), "idle-rss-MB")
		b.ReportMetric(float64(p50.Microseconds())/1000, "get-p50-ms")
		b.ReportMetric(float64(p99.Microseconds())/1000, "get-p99-ms")
		fmt.Printf("sovrad on SQLite, --controllers %s: ready in %.2f s (target ≤ 5 s), RSS %.0f MB %s after ready, idle RSS %.0f MB %s after ready (target ≤ 300 MB), kubectl get p50 %.1f ms p99 %.1f ms over %d calls (target p50 ≤ 60 ms)\n",
			controllers, ready.Seconds(), float64(started)/(1<<20), startSettle, float64(rss)/(1<<20), idleSettle, float64(p50.Microseconds())/1000, float64(p99.Microseconds())/1000, getRequests)
		d.Stop()
	}
}
