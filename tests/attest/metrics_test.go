package attest

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"go.uber.org/zap/zaptest"
	"k8s.io/component-base/metrics/testutil"

	agentattest "github.com/sovra-dev/sovra/agent/attest"
	"github.com/sovra-dev/sovra/tests/swtpmlab"
)

// dashboardFile is the Grafana dashboard shipped with sovra.
var dashboardFile = filepath.Join("..", "..", "images", "grafana-dashboard.json")

// scrape reads sovrad's /metrics as a Prometheus scrape with the admin
// kubeconfig's client certificate does.
func (d *daemon) scrape(t *testing.T) (text string, families map[string]*dto.MetricFamily) {
	t.Helper()
	text = d.kubectl(t, "get", "--raw", "/metrics")
	parser := expfmt.NewTextParser(model.LegacyValidation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(text))
	if err != nil {
		t.Fatalf("parsing /metrics: %v", err)
	}
	return text, families
}

// value is the value of the series of family name with labels (name=value
// pairs), zero when there is none.
func value(families map[string]*dto.MetricFamily, name string, labels ...string) float64 {
	mf := families[name]
	if mf == nil {
		return 0
	}
	want := map[string]string{}
	for i := 0; i+1 < len(labels); i += 2 {
		want[labels[i]] = labels[i+1]
	}
	for _, m := range mf.GetMetric() {
		if !testutil.LabelsMatch(m, want) {
			continue
		}
		switch {
		case m.GetCounter() != nil:
			return m.GetCounter().GetValue()
		case m.GetGauge() != nil:
			return m.GetGauge().GetValue()
		}
	}
	return 0
}

// metricsCluster is a Cluster API Cluster for the controllers to reconcile.
const metricsCluster = `apiVersion: cluster.x-k8s.io/v1beta1
kind: Cluster
metadata:
  name: metrics
  namespace: default
spec: {}
`

// TestMetrics: a real agent (swtpm, EK certificate) enrolls and attests,
// Talos's KMS client seals and unseals; sovrad's /metrics, read as a
// Prometheus scrape does, counts the enrollment (by method), the sealing
// window it opened, the attestation verdict and each key decision (by op,
// decision and reason), and shows the reconcile metrics of the in-process
// controllers. Every metric the Grafana dashboard queries is there.
func TestMetrics(t *testing.T) {
	l := newSwtpmLab(t)
	d := startDaemon(t, append([]string{"--controllers", "all"}, l.ekFlags(t)...)...)
	ctx := context.Background()
	_, before := d.scrape(t)

	tpm, log := l.use(t, 0)
	a := &agentattest.Agent{
		TPM: tpm, Client: d.api, Claims: swtpmlab.NodeRoot(t), EventLogPath: log,
		Node:   agentattest.Node{UUID: newUUID(), Hostname: "metrics-1", Addresses: []string{nodeAddr}},
		Logger: zaptest.NewLogger(t),
	}
	if err := a.Enroll(ctx); err != nil {
		t.Fatalf("enroll: %v\n%s", err, d.Tail(20))
	}
	if _, err := a.Attest(ctx); err != nil {
		t.Fatalf("attest: %v\n%s", err, d.Tail(20))
	}
	// Seal in the window enrollment opened, then Unseal once the KMS's
	// cache has the verdict: one allowed call of each.
	key := random(32)
	var blob []byte
	for deadline := time.Now().Add(converge); ; time.Sleep(pollPause) {
		var err error
		if blob, err = d.seal(ctx, a.Node.UUID, key); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("seal: %v\n%s", err, d.Tail(20))
		}
	}
	for deadline := time.Now().Add(converge); ; time.Sleep(pollPause) {
		got, err := d.unseal(ctx, a.Node.UUID, blob)
		if err == nil {
			if !bytes.Equal(got, key) {
				t.Fatal("unsealed another key")
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("unseal: %v\n%s", err, d.Tail(20))
		}
	}
	// A denial, by its reason.
	if _, err := d.unseal(ctx, zeroUUID, blob); err == nil {
		t.Fatal("an unknown UUID unsealed")
	}

	_, after := d.scrape(t)
	for _, c := range []struct {
		name   string
		labels []string
	}{
		{"sovra_enrollments_total", []string{"outcome", "enrolled", "method", "Certificate"}},
		{"sovra_sealing_windows_opened_total", []string{"reason", "Enrollment"}},
		{"sovra_attestations_total", []string{"result", "passed", "reason", "AttestationPassed"}},
		{"sovra_kms_decisions_total", []string{"op", "Seal", "decision", "allowed", "reason", "Sealed"}},
		{"sovra_kms_decisions_total", []string{"op", "Unseal", "decision", "allowed", "reason", "Released"}},
		{"sovra_kms_decisions_total", []string{"op", "Unseal", "decision", "denied", "reason", "UnknownNode"}},
	} {
		if got := value(after, c.name, c.labels...) - value(before, c.name, c.labels...); got != 1 {
			t.Errorf("%s%v counted %v times, want 1", c.name, c.labels, got)
		}
	}
	ledger := func(f map[string]*dto.MetricFamily) float64 {
		return value(f, "sovra_kms_ledger_entries", "verdict", "Pending") + value(f, "sovra_kms_ledger_entries", "verdict", "Explained")
	}
	if got := ledger(after) - ledger(before); got != 1 {
		t.Errorf("the ledger gauge grew by %v entries, want the one release", got)
	}

	// A Cluster for the controllers to reconcile, so that the reconcile
	// duration histogram has a sample.
	d.WaitEstablished("clusters.cluster.x-k8s.io")
	manifest := filepath.Join(t.TempDir(), "cluster.yaml")
	if err := os.WriteFile(manifest, []byte(metricsCluster), 0o600); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(readyTimeout); ; time.Sleep(time.Second) {
		_, err := d.TryKubectl("apply", "-f", manifest)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("creating a Cluster: %v", err) // the webhooks register after the CRDs
		}
	}
	var text string
	for deadline := time.Now().Add(readyTimeout); ; time.Sleep(time.Second) {
		text, after = d.scrape(t)
		if value(after, "controller_runtime_reconcile_total", "controller", "cluster", "result", "success")+
			value(after, "controller_runtime_reconcile_total", "controller", "cluster", "result", "requeue_after") > 0 &&
			strings.Contains(text, `controller_runtime_reconcile_time_seconds_bucket{controller="cluster"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no reconcile of the Cluster counted:\n%s", grepLines(text, "controller_runtime_reconcile_total"))
		}
	}

	queried := dashboardMetrics(t)
	if len(queried) < 10 {
		t.Fatalf("the dashboard queries only %v", queried)
	}
	for _, m := range queried {
		if !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(m) + `[{ ]`).MatchString(text) {
			t.Errorf("the dashboard queries %s, which sovrad's /metrics does not have", m)
		}
	}
	t.Logf("the dashboard's %d metrics are all served:\n%s", len(queried), grepLines(text, "sovra_kms_decisions_total{"))
}

// metricNamePattern finds the names of sovra's and controller-runtime's
// series in a PromQL expression.
var metricNamePattern = regexp.MustCompile(`\b(?:sovra|controller_runtime)_[a-z0-9_]+\b`)

// dashboardMetrics returns the metric names the dashboard's panels query;
// it fails t when the file is not a dashboard of panels with queries.
func dashboardMetrics(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Type    string
			Title   string
			Targets []struct{ Expr string }
		}
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("%s is not JSON: %v", dashboardFile, err)
	}
	var names []string
	for _, p := range dash.Panels {
		if p.Type == "row" {
			continue
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q queries nothing", p.Title)
		}
		for _, q := range p.Targets {
			found := metricNamePattern.FindAllString(q.Expr, -1)
			if len(found) == 0 {
				t.Errorf("panel %q: query %q names no sovra or controller-runtime metric", p.Title, q.Expr)
			}
			names = append(names, found...)
		}
	}
	slices.Sort(names)
	return slices.Compact(names)
}

// grepLines returns the lines of text that contain s.
func grepLines(text, s string) string {
	var out []string
	for _, line := range strings.Split(text, "\n") {
		if strings.Contains(line, s) {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}
