package metrics

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"k8s.io/component-base/metrics/legacyregistry"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"
)

// TestGatheredPassesPrefixedFamilies: the families of the source registry
// with the prefix come through unchanged (type, help, labels, values,
// histogram buckets); the others do not.
func TestGatheredPassesPrefixedFamilies(t *testing.T) {
	src := prometheus.NewRegistry()
	total := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "controller_runtime_reconcile_total", Help: "reconciles"}, []string{"controller", "result"})
	took := prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "controller_runtime_reconcile_time_seconds", Help: "time", Buckets: []float64{0.1, 1}}, []string{"controller"})
	other := prometheus.NewGauge(prometheus.GaugeOpts{Name: "workqueue_depth", Help: "depth"})
	src.MustRegister(total, took, other)
	total.WithLabelValues("cluster", "success").Add(3)
	total.WithLabelValues("cluster", "error").Add(1)
	took.WithLabelValues("cluster").Observe(0.5)
	other.Set(7)

	dst := prometheus.NewRegistry()
	dst.MustRegister(&gathered{from: src, prefix: controllerRuntimePrefix})
	want := `
# HELP controller_runtime_reconcile_total reconciles
# TYPE controller_runtime_reconcile_total counter
controller_runtime_reconcile_total{controller="cluster",result="error"} 1
controller_runtime_reconcile_total{controller="cluster",result="success"} 3
# HELP controller_runtime_reconcile_time_seconds time
# TYPE controller_runtime_reconcile_time_seconds histogram
controller_runtime_reconcile_time_seconds_bucket{controller="cluster",le="0.1"} 0
controller_runtime_reconcile_time_seconds_bucket{controller="cluster",le="1"} 1
controller_runtime_reconcile_time_seconds_bucket{controller="cluster",le="+Inf"} 1
controller_runtime_reconcile_time_seconds_sum{controller="cluster"} 0.5
controller_runtime_reconcile_time_seconds_count{controller="cluster"} 1
`
	if err := testutil.GatherAndCompare(dst, strings.NewReader(want)); err != nil {
		t.Fatal(err)
	}
	if n, err := testutil.GatherAndCount(dst, "workqueue_depth"); err != nil || n != 0 {
		t.Fatalf("a family without the prefix came through: %d, %v", n, err)
	}
}

// TestServedRegistry: the registry /metrics serves holds sovra's metrics
// and what controller-runtime registers in its own registry.
func TestServedRegistry(t *testing.T) {
	probe := prometheus.NewCounter(prometheus.CounterOpts{Name: "controller_runtime_metrics_test_total", Help: "probe"})
	ctrlmetrics.Registry.MustRegister(probe)
	t.Cleanup(func() { ctrlmetrics.Registry.Unregister(probe) })
	probe.Add(2)
	KMSDecisions.WithLabelValues("Unseal", "allowed", "Released").Inc()

	families, err := legacyregistry.DefaultGatherer.Gather()
	if err != nil {
		t.Fatal(err)
	}
	found := map[string]bool{}
	for _, mf := range families {
		found[mf.GetName()] = true
	}
	for _, name := range []string{"controller_runtime_metrics_test_total", "sovra_kms_decisions_total"} {
		if !found[name] {
			t.Errorf("%s is not in the served registry", name)
		}
	}
}
