package metrics

import (
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/protobuf/proto"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"
)

// controllerRuntimePrefix selects the families of controller-runtime's
// registry that /metrics shows: the reconcile metrics of every in-process
// controller (controller_runtime_reconcile_total, _errors_total,
// _time_seconds, active workers...) and of the webhooks. The rest of that
// registry (process, Go runtime, workqueue, client-go and leader-election
// metrics) has the names of the API server's own families, which the
// legacy registry already serves for the whole process.
const controllerRuntimePrefix = "controller_runtime_"

// controllerRuntime shows controller-runtime's reconcile metrics, which it
// registers in a registry of its own, in the legacy registry.
var controllerRuntime = &gathered{from: ctrlmetrics.Registry, prefix: controllerRuntimePrefix}

// gathered is a collector of the families of another registry whose names
// start with prefix, passed through unchanged at every scrape. It is
// unchecked (it describes nothing): the families are known only when
// gathered.
type gathered struct {
	from   prometheus.Gatherer
	prefix string
}

// Describe implements prometheus.Collector.
func (g *gathered) Describe(chan<- *prometheus.Desc) {}

// Collect implements prometheus.Collector.
func (g *gathered) Collect(ch chan<- prometheus.Metric) {
	families, err := g.from.Gather()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(prometheus.NewDesc(g.prefix+"gather_error", "gathering controller-runtime's metrics failed", nil, nil), err)
		return
	}
	for _, mf := range families {
		if !strings.HasPrefix(mf.GetName(), g.prefix) {
			continue
		}
		for _, m := range mf.GetMetric() {
			names := make([]string, 0, len(m.GetLabel()))
			for _, l := range m.GetLabel() {
				names = append(names, l.GetName())
			}
			ch <- &passthrough{desc: prometheus.NewDesc(mf.GetName(), mf.GetHelp(), names, nil), m: m}
		}
	}
}

// passthrough is a gathered sample, written as it was gathered.
type passthrough struct {
	desc *prometheus.Desc
	m    *dto.Metric
}

func (p *passthrough) Desc() *prometheus.Desc { return p.desc }

func (p *passthrough) Write(out *dto.Metric) error {
	proto.Merge(out, p.m)
	return nil
}
