package images

import (
	"encoding/json"
	"os"
	"testing"
)

// dashboardFile is the Grafana dashboard of sovrad's metrics. That every
// metric it queries is on sovrad's /metrics is checked against the built
// daemon (tests/attest TestMetrics).
const dashboardFile = "grafana-dashboard.json"

type dashboard struct {
	UID        string
	Title      string
	Templating struct {
		List []struct{ Name, Type, Query string }
	}
	Panels []struct {
		ID         int
		Type       string
		Title      string
		Datasource struct{ Type, UID string }
		GridPos    struct{ H, W, X, Y int }
		Targets    []struct{ Expr, RefID string }
	}
}

// TestDashboard: the dashboard is JSON Grafana imports: a data source
// variable every panel uses, unique panel IDs on the 24-column grid, and
// panels that each query something.
func TestDashboard(t *testing.T) {
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s is not JSON: %v", dashboardFile, err)
	}
	if d.UID == "" || d.Title == "" || len(d.Templating.List) == 0 || d.Templating.List[0].Name != "datasource" || d.Templating.List[0].Query != "prometheus" {
		t.Fatalf("dashboard %q (%q) has no Prometheus data source variable: %+v", d.Title, d.UID, d.Templating)
	}
	ids := map[int]bool{}
	queries := 0
	for _, p := range d.Panels {
		if ids[p.ID] {
			t.Errorf("panel ID %d used twice", p.ID)
		}
		ids[p.ID] = true
		if p.GridPos.X < 0 || p.GridPos.W <= 0 || p.GridPos.X+p.GridPos.W > 24 || p.GridPos.H <= 0 {
			t.Errorf("panel %q is off the grid: %+v", p.Title, p.GridPos)
		}
		if p.Type == "row" {
			continue
		}
		if p.Title == "" || p.Datasource.UID != "${datasource}" || len(p.Targets) == 0 {
			t.Errorf("panel %d %q: title, data source ${datasource} and queries are required", p.ID, p.Title)
		}
		refs := map[string]bool{}
		for _, q := range p.Targets {
			if q.Expr == "" || q.RefID == "" || refs[q.RefID] {
				t.Errorf("panel %q: query %+v needs an expression and a unique refId", p.Title, q)
			}
			refs[q.RefID] = true
			queries++
		}
	}
	if queries == 0 {
		t.Fatal("the dashboard queries nothing")
	}
}
