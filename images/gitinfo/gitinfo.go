// Package gitinfo reads what an image build stamps from git: the version
// (`git describe`, as the Makefile's VERSION) and the commit time, used as the
// timestamp of every file so that rebuilding a commit gives the same digests.
package gitinfo

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// Version returns `git describe --tags --always --dirty` in dir, or "dev"
// when dir is not a git checkout (the Makefile's fallback too).
func Version(ctx context.Context, dir string) string {
	out, err := git(ctx, dir, "describe", "--tags", "--always", "--dirty")
	if err != nil || out == "" {
		return "dev"
	}

	return out
}

// Created returns $SOURCE_DATE_EPOCH when set, else the time of the commit
// checked out in dir, else the Unix epoch.
func Created(ctx context.Context, dir string) (time.Time, error) {
	if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		secs, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return time.Time{}, fmt.Errorf("parsing SOURCE_DATE_EPOCH=%q: %w", s, err)
		}

		return time.Unix(secs, 0).UTC(), nil
	}

	out, err := git(ctx, dir, "log", "-1", "--format=%ct")
	if err != nil || out == "" {
		return time.Unix(0, 0).UTC(), nil //nolint:nilerr // not a checkout: a fixed time keeps builds reproducible
	}

	secs, err := strconv.ParseInt(out, 10, 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("parsing the commit time %q: %w", out, err)
	}

	return time.Unix(secs, 0).UTC(), nil
}

// RepoRoot returns the top of the git checkout that holds dir.
func RepoRoot(ctx context.Context, dir string) (string, error) {
	out, err := git(ctx, dir, "rev-parse", "--show-toplevel")
	if err != nil {
		return "", fmt.Errorf("finding the repository root from %s: %w", dir, err)
	}

	return out, nil
}

func git(ctx context.Context, dir string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "git", args...)
	cmd.Dir = dir

	out, err := cmd.Output()

	return strings.TrimSpace(string(out)), err
}
