package device

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
)

func TestOpenFallsBack(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "tpm0")
	if err := os.WriteFile(raw, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	rw, err := Device{Paths: []string{filepath.Join(dir, "tpmrm0"), raw}}.Open()
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	if got := rw.(*os.File).Name(); got != raw {
		t.Errorf("opened %s, want %s", got, raw)
	}
	rw.Close()
}

func TestOpenReportsMissing(t *testing.T) {
	dir := t.TempDir()
	_, err := Device{Paths: []string{filepath.Join(dir, "a"), filepath.Join(dir, "b")}}.Open()
	if !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Open error = %v, want ErrNotExist", err)
	}
}
