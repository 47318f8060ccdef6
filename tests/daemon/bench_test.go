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
	idleSettle  = 10 * time.Second
	getRequests = 100
)

// BenchmarkDaemon prints the daemon's start-to-ready time, its idle RSS and
// the latency of `kubectl get` (the real kubectl process, as a user runs it)
// on the embedded SQLite default: the API server alone (--controllers none)
// and with every in-process controller (the default). Targets: ready ≤ 5 s,
// RSS ≤ 300 MB, kubectl get p50 ≤ 60 ms. Run with -benchtime 1x.
func BenchmarkDaemon(b *testing.B) {
	for _, controllers := range []string{"none", "all"} {
		b.Run("controllers="+controllers, func(b *testing.B) { benchDaemon(b, controllers) })
	}
}

func benchDaemon(b *testing.B, controllers string) {
	for i := 0; i < b.N; i++ {
		d := sovradtest.Start(b, filepath.Join(b.TempDir(), "data"), "--controllers", controllers)
		ready := d.ReadyAt.Sub(d.StartedAt)

		time.Sleep(idleSettle)
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
		b.ReportMetric(float64(rss)/(1<<20), "idle-rss-MB")
		b.ReportMetric(float64(p50.Microseconds())/1000, "get-p50-ms")
		b.ReportMetric(float64(p99.Microseconds())/1000, "get-p99-ms")
		fmt.Printf("sovrad on SQLite, --controllers %s: ready in %.2f s (target ≤ 5 s), idle RSS %.0f MB (target ≤ 300 MB), kubectl get p50 %.1f ms p99 %.1f ms over %d calls (target p50 ≤ 60 ms)\n",
			controllers, ready.Seconds(), float64(rss)/(1<<20), float64(p50.Microseconds())/1000, float64(p99.Microseconds())/1000, getRequests)
		d.Stop()
	}
}
