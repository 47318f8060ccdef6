package extension_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/sovra-dev/sovra/extension"
	"github.com/sovra-dev/sovra/internal/testutil"
)

// Goal of the agent's footprint (issue 13): the binary the extension ships,
// per architecture. It was 31 MB when the agent linked the Talos machinery
// client and resource types (tests/layout TestAgentLinksNoMachineConfig
// keeps them out).
const (
	goalAgentBinary = 25_000_000
	megabyte        = 1_000_000
)

// checkAgentSize fails when the agent binary at file is over the goal.
func checkAgentSize(t testing.TB, file, arch string) int64 {
	t.Helper()

	st, err := os.Stat(file)
	if err != nil {
		t.Fatal(err)
	}

	if st.Size() > goalAgentBinary {
		t.Errorf("the %s agent binary is %.1f MB, over the goal of %d MB: `go tool nm -size -sort size` and `go version -m` show what it links",
			arch, float64(st.Size())/megabyte, goalAgentBinary/megabyte)
	}

	return st.Size()
}

// BenchmarkAgentBinarySize builds the agent for every architecture exactly
// as the extension ships it (extension.BuildAgent: static, -trimpath,
// -s -w) and reports its size.
func BenchmarkAgentBinarySize(b *testing.B) {
	testutil.Require(b, "go")

	dir := b.TempDir()

	for _, arch := range extension.Archs {
		out := filepath.Join(dir, extension.Name+"-"+arch)

		for range b.N {
			if err := extension.BuildAgent(context.Background(), testutil.RepoRoot(b), arch, testVersion, out); err != nil {
				b.Fatal(err)
			}
		}

		size := checkAgentSize(b, out, arch)
		b.ReportMetric(float64(size)/megabyte, arch+"-MB")
		b.Logf("agent binary for linux/%s: %.1f MB (%d bytes; goal ≤ %d MB)", arch, float64(size)/megabyte, size, goalAgentBinary/megabyte)
	}
}
