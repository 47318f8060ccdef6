package kubecontrollers

import (
	"slices"
	"testing"

	"github.com/sovra-dev/sovra/daemon/capi/controllers"
)

// TestNames: every controller here is selectable with --controllers, once,
// and Any tells a selection of them from one of Cluster API's only.
func TestNames(t *testing.T) {
	seen := map[string]bool{}
	for _, c := range all {
		if !slices.Contains(controllers.Names, c.name) || seen[c.name] || c.start == nil {
			t.Errorf("controller %q: not a --controllers name, listed twice, or no start", c.name)
		}
		seen[c.name] = true
	}
	if Any(controllers.Set{controllers.Cluster: true}) || !Any(controllers.Set{controllers.RootCACertPublisher: true}) {
		t.Error("Any")
	}
}
