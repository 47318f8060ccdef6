// Package layout_test checks the rules of the source tree that the
// architecture rests on: the agent and the daemon never import each other,
// and every package says what it is for.
package layout_test

import (
	"encoding/json"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sovra-dev/sovra/internal/testutil"
)

const module = "github.com/sovra-dev/sovra"

func TestAgentAndDaemonAreIndependent(t *testing.T) {
	for _, c := range []struct{ from, forbidden string }{
		{"./agent/...", module + "/daemon"},
		{"./daemon/...", module + "/agent"},
	} {
		cmd := exec.Command("go", "list", "-deps", "-test", "-json=ImportPath", c.from)
		cmd.Dir = testutil.RepoRoot(t)
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("go list %s: %v", c.from, err)
		}
		dec := json.NewDecoder(strings.NewReader(string(out)))
		seen := 0
		for dec.More() {
			var p struct{ ImportPath string }
			if err := dec.Decode(&p); err != nil {
				t.Fatal(err)
			}
			seen++
			if p.ImportPath == c.forbidden || strings.HasPrefix(p.ImportPath, c.forbidden+"/") {
				t.Errorf("%s depends on %s", c.from, p.ImportPath)
			}
		}
		if seen == 0 {
			t.Fatalf("go list %s listed nothing", c.from)
		}
	}
}

func TestEveryPackageHasADoc(t *testing.T) {
	root := testutil.RepoRoot(t)
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			return nil
		}
		name := d.Name()
		if path != root && (strings.HasPrefix(name, ".") || name == "testdata" || name == "bin" || name == "dist") {
			return filepath.SkipDir
		}
		pkgs, err := parser.ParseDir(token.NewFileSet(), path, func(fi fs.FileInfo) bool {
			return !strings.HasSuffix(fi.Name(), "_test.go")
		}, parser.ParseComments|parser.PackageClauseOnly)
		if err != nil {
			return err
		}
		for _, p := range pkgs {
			documented := false
			for _, f := range p.Files {
				if f.Doc != nil && strings.TrimSpace(f.Doc.Text()) != "" {
					documented = true
				}
			}
			if !documented {
				rel, _ := filepath.Rel(root, path)
				t.Errorf("package %s (%s) has no package doc", p.Name, rel)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// maxTrackedFile is the largest file the repository may hold: build output
// (a 170 MB sovrad was once committed) never belongs in it.
const maxTrackedFile = 5 << 20

func TestNoLargeFilesTracked(t *testing.T) {
	root := testutil.RepoRoot(t)
	cmd := exec.Command("git", "ls-files", "-z")
	cmd.Dir = root
	out, err := cmd.Output()
	if err != nil {
		t.Skipf("not a git checkout: %v", err)
	}
	for _, name := range strings.Split(strings.TrimRight(string(out), "\x00"), "\x00") {
		st, err := os.Lstat(filepath.Join(root, name))
		if err != nil {
			continue // deleted in the work tree
		}
		if st.Size() > maxTrackedFile {
			t.Errorf("%s is %d MB: files over %d MB must not be committed (build output belongs in bin/ or dist/)", name, st.Size()>>20, maxTrackedFile>>20)
		}
	}
}
