package main

import (
	"bytes"
	"strings"
	"testing"
)

// TestPolicyCommandArguments: help exits 0, bad arguments exit 2 with a
// message, before anything is read.
func TestPolicyCommandArguments(t *testing.T) {
	for _, c := range []struct {
		args []string
		code int
		says string
	}{
		{nil, exitUsage, "usage: sovrad policy capture"},
		{[]string{"list"}, exitUsage, "usage: sovrad policy capture"},
		{[]string{"--help"}, exitOK, "usage: sovrad policy capture"},
		{[]string{"capture", "--help"}, exitOK, "--from-node"},
		{[]string{"capture"}, exitUsage, "--from-node is required"},
		{[]string{"capture", "--from-node", "n", "--claims", "boot.id"}, exitUsage, "differs on every boot"},
		{[]string{"capture", "--from-node", "n", "--pcrs", "12"}, exitUsage, "PCR 12 is not quoted"},
		{[]string{"capture", "--from-node", "n", "--mode", "Audit"}, exitUsage, "use Warn or Enforce"},
		{[]string{"capture", "--from-node", "n", "--selector", "gen>2"}, exitUsage, "--selector"},
	} {
		var out, errOut bytes.Buffer
		code := policyCommand(c.args, &out, &errOut)
		if code != c.code || !strings.Contains(errOut.String(), c.says) || out.Len() != 0 {
			t.Errorf("%q: exit %d, stderr %q, stdout %q; want exit %d saying %q", c.args, code, errOut.String(), out.String(), c.code, c.says)
		}
	}
}
