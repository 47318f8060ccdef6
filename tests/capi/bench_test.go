package capi_test

import (
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/tests/capi/testinfra"
	"github.com/sovra-dev/sovra/tests/sovradtest"
)

// idleSettle is how long the controllers sit with nothing to do before the
// resident set is measured.
const idleSettle = 10 * time.Second

// BenchmarkClusterAPI measures, with the built daemon on SQLite: the time
// from the process start until every Cluster API CRD is Established, the
// resident set with the controllers idle, and the time from `kubectl apply`
// of a three-node TalosControlPlane until CABPT wrote the bootstrap data of
// all three Machines.
func BenchmarkClusterAPI(b *testing.B) {
	for range b.N {
		d := startDaemon(b, filepath.Join(b.TempDir(), "data"))
		waitCRDs(b, d)
		established := time.Since(d.StartedAt)

		testinfra.Start(b, d)
		time.Sleep(idleSettle)
		rss, err := sovradtest.RSS(d.PID())
		if err != nil {
			b.Fatal(err)
		}

		const ns, name = "bench", "bench"
		applied := time.Now()
		mustApply(b, d, testinfra.ClusterYAML(ns, name, 3, 0))
		waitFor(b, reconcileTimeout, "3 control-plane Machines with bootstrap data", func() (bool, string) {
			cp, _ := bootstrapped(machines(b, d, ns, name))
			return cp == 3, fmt.Sprintf("%d bootstrapped", cp)
		})
		bootstrap := time.Since(applied)

		b.ReportMetric(established.Seconds(), "crds-established-s")
		b.ReportMetric(float64(rss)/(1<<20), "idle-rss-MiB")
		b.ReportMetric(bootstrap.Seconds(), "apply-to-3cp-bootstrap-s")
		b.Logf("start to all %d Cluster API CRDs Established: %s", wantCRDs, established.Round(10*time.Millisecond))
		b.Logf("RSS with the controllers idle (%s after start-up): %.0f MiB", idleSettle, float64(rss)/(1<<20))
		b.Logf("kubectl apply to bootstrap data written for a 3-node control plane: %s", bootstrap.Round(10*time.Millisecond))
	}
}
