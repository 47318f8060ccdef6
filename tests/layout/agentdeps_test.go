package layout_test

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/sovra-dev/sovra/internal/testutil"
)

// agentBinary is the package of the agent's binary.
const agentBinary = "./agent/cmd/sovra-agent"

// agentForbidden are packages the agent binary must not link: each one is
// megabytes the agent never calls. They came in through the Talos
// machinery client and its resource types (machine config types, CEL, the
// OpenPGP request signing of Omni); agent/runtime/talosapi speaks to apid
// with the generated API clients instead. An entry ending in "/" forbids a
// whole tree; allowed lists the small leaves of a forbidden tree the agent
// does use.
var (
	agentForbidden = []string{
		"github.com/siderolabs/talos/pkg/machinery/config/",
		"github.com/siderolabs/talos/pkg/machinery/client",
		"github.com/siderolabs/talos/pkg/machinery/resources/",
		"github.com/siderolabs/talos/pkg/machinery/cel",
		"github.com/google/cel-go/",
		"github.com/ProtonMail/",
		"github.com/cloudflare/circl/",
		"k8s.io/",
		"sigs.k8s.io/",
	}
	agentAllowed = []string{
		// machine.Type, the enum of the machine type resource.
		"github.com/siderolabs/talos/pkg/machinery/config/machine",
		// The talosconfig file format.
		"github.com/siderolabs/talos/pkg/machinery/client/config",
	}
)

// TestAgentLinksNoMachineConfig keeps the agent binary small (issue 13: at
// most 25 MB, measured by BenchmarkAgentBinarySize in tests/extension):
// it fails when an import brings back a forbidden tree.
func TestAgentLinksNoMachineConfig(t *testing.T) {
	cmd := exec.Command("go", "list", "-deps", agentBinary)
	cmd.Dir = testutil.RepoRoot(t)
	cmd.Env = append(cmd.Environ(), "CGO_ENABLED=0", "GOOS=linux")

	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list %s: %v", agentBinary, err)
	}

	deps := strings.Fields(string(out))
	if len(deps) == 0 {
		t.Fatalf("go list %s listed nothing", agentBinary)
	}

	for _, dep := range deps {
		if forbiddenForAgent(dep) {
			t.Errorf("the agent links %s: find the import that brings it (go list -deps -json %s) and narrow it", dep, agentBinary)
		}
	}
}

func forbiddenForAgent(dep string) bool {
	for _, a := range agentAllowed {
		if dep == a {
			return false
		}
	}

	for _, f := range agentForbidden {
		if dep == strings.TrimSuffix(f, "/") || strings.HasPrefix(dep, f) {
			return true
		}
	}

	return false
}
