package gitinfo

import (
	"context"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/internal/testutil"
)

func TestCreatedFromSourceDateEpoch(t *testing.T) {
	t.Setenv("SOURCE_DATE_EPOCH", "1700000000")

	got, err := Created(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}

	if !got.Equal(time.Unix(1700000000, 0)) {
		t.Fatalf("Created = %v", got)
	}

	t.Setenv("SOURCE_DATE_EPOCH", "yesterday")

	if _, err := Created(context.Background(), t.TempDir()); err == nil {
		t.Fatal("a malformed SOURCE_DATE_EPOCH was accepted")
	}
}

func TestOutsideACheckout(t *testing.T) {
	t.Setenv("SOURCE_DATE_EPOCH", "")

	dir := t.TempDir()

	if v := Version(context.Background(), dir); v != "dev" {
		t.Errorf("Version outside a checkout = %q, want dev", v)
	}

	got, err := Created(context.Background(), dir)
	if err != nil || !got.Equal(time.Unix(0, 0)) {
		t.Errorf("Created outside a checkout = %v, %v; want the epoch", got, err)
	}
}

func TestInThisCheckout(t *testing.T) {
	testutil.Require(t, "git")
	t.Setenv("SOURCE_DATE_EPOCH", "")

	root := testutil.RepoRoot(t)

	if v := Version(context.Background(), root); v == "" || v == "dev" {
		t.Errorf("Version = %q, want git describe output", v)
	}

	got, err := Created(context.Background(), root)
	if err != nil || got.Before(time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC)) {
		t.Errorf("Created = %v, %v; want the commit time", got, err)
	}
}
