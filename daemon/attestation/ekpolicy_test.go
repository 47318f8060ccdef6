package attestation

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sovra-dev/sovra/internal/attest/attesttest"
)

func TestEKPolicyFiles(t *testing.T) {
	f, err := attesttest.Load()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	write := func(name, s string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	hash := strings.Repeat("ab", 32)
	p, err := EKPolicyFiles{
		Roots: write("roots.pem", string(f.EKRootPEM)), Intermediates: write("inter.pem", string(f.EKIntermediatePEM)),
		AllowList: write("allow", "# lab nodes\n"+strings.ToUpper(hash)+"  # node 1\n\n"),
	}.Load()
	if err != nil || p.Roots == nil || p.Intermediates == nil || !p.Allowed[hash] {
		t.Fatalf("Load = %+v, %v", p, err)
	}
	_, err = EKPolicyFiles{Roots: write("bad.pem", "nothing"), AllowList: write("bad-allow", "xyz\n"), Intermediates: filepath.Join(dir, "absent")}.Load()
	for _, want := range []string{"EK roots", "EK intermediates", "line 1"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Load error %v, want it to mention %q", err, want)
		}
	}
}
