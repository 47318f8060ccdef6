package main

import (
	"bytes"
	"strings"
	"testing"
)

func TestDispatch(t *testing.T) {
	for _, c := range []struct {
		args     []string
		code     int
		out, err string
	}{
		{args: []string{"version"}, code: exitOK, out: "dev"},
		{args: []string{"help"}, code: exitOK, out: "KOMMODITY_AUTOBOOTSTRAP_NETWORK_CIDR"},
		{args: []string{"frobnicate"}, code: exitUsage, err: "unknown command"},
		{args: []string{"run", "--network-cidr", "8.8.8.0/24"}, code: exitUsage, err: "not a private range"},
		{args: []string{"--network-cidr", "10.0.0.0/8"}, code: exitUsage, err: "larger than 65536"},
		{args: []string{"discover"}, code: exitUsage, err: "needs a network CIDR"},
	} {
		t.Run(strings.Join(c.args, " "), func(t *testing.T) {
			var stdout, stderr bytes.Buffer

			if code := dispatch(c.args, &stdout, &stderr); code != c.code {
				t.Fatalf("exit %d, want %d; stderr:\n%s", code, c.code, stderr.String())
			}

			if !strings.Contains(stdout.String(), c.out) || !strings.Contains(stderr.String(), c.err) {
				t.Fatalf("stdout:\n%s\nstderr:\n%s", stdout.String(), stderr.String())
			}
		})
	}
}
