package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestKeyringCommand(t *testing.T) {
	path := filepath.Join(t.TempDir(), "master.keys")
	var out, errOut bytes.Buffer
	if code := keyringCommand([]string{"rotate", path}, &out, &errOut); code != exitFailed || !strings.Contains(errOut.String(), "sovrad keyring init "+path) {
		t.Fatalf("rotate of a missing keyring: exit %d, %q; want a refusal that names keyring init", code, errOut.String())
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatal("rotate created a keyring")
	}
	if code := keyringCommand([]string{"init", path}, &out, &errOut); code != exitOK || !strings.Contains(out.String(), "versions [1]; version 1 seals") {
		t.Fatalf("init exit %d: %q %q", code, out.String(), errOut.String())
	}
	before, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	errOut.Reset()
	if code := keyringCommand([]string{"init", path}, &out, &errOut); code != exitFailed || !strings.Contains(errOut.String(), "exists") {
		t.Fatalf("init of an existing keyring: exit %d %q", code, errOut.String())
	}
	if again, _ := os.ReadFile(path); !bytes.Equal(again, before) {
		t.Fatal("init replaced an existing keyring")
	}

	out.Reset()
	if code := keyringCommand([]string{"rotate", path}, &out, &errOut); code != exitOK {
		t.Fatalf("rotate exit %d: %s", code, errOut.String())
	}
	if !strings.Contains(out.String(), "added master key version 2") || !strings.Contains(out.String(), "versions [1 2]; version 2 seals") {
		t.Fatalf("rotate printed %q", out.String())
	}
	after, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(after, before) {
		t.Fatal("rotation changed version 1")
	}
	for _, line := range strings.Split(string(after), "\n") {
		if f := strings.Fields(line); len(f) == 2 && strings.Contains(out.String(), f[1]) {
			t.Fatal("the command printed a key")
		}
	}
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("keyring mode after rotation: %v %v", st.Mode(), err)
	}

	out.Reset()
	if code := keyringCommand([]string{"list", path}, &out, &errOut); code != exitOK || !strings.Contains(out.String(), "version 2 seals") {
		t.Fatalf("list exit %d: %q", code, out.String())
	}

	for _, args := range [][]string{{"--help"}, {"help"}, {"list", "--help"}} {
		out.Reset()
		if code := keyringCommand(args, &out, &errOut); code != exitOK || !strings.Contains(out.String(), "usage: sovrad keyring init|list|rotate") {
			t.Errorf("%q: exit %d, %q; want the usage on stdout", args, code, out.String())
		}
	}
	for _, args := range [][]string{nil, {"rotate"}, {"shred", path}, {"list", "-x"}} {
		errOut.Reset()
		if code := keyringCommand(args, &out, &errOut); code != exitUsage || !strings.Contains(errOut.String(), "usage: sovrad keyring") {
			t.Errorf("%q: exit %d, %q; want usage", args, code, errOut.String())
		}
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	errOut.Reset()
	if code := keyringCommand([]string{"rotate", path}, &out, &errOut); code != exitFailed || errOut.Len() == 0 {
		t.Fatalf("rotating a world-readable keyring: exit %d %q, want a refusal", code, errOut.String())
	}
	if got, _ := os.ReadFile(path); !bytes.Equal(got, after) {
		t.Fatal("a refused rotation changed the file")
	}
}
