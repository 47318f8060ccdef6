package datadir

import (
	"testing"

	"github.com/sovra-dev/sovra/daemon/auditpolicy"
)

// TestDefaultAuditPolicyKeepsSaltsOut: the default policy passes the check
// an operator's policy must pass.
func TestDefaultAuditPolicyKeepsSaltsOut(t *testing.T) {
	if err := auditpolicy.CheckBytes([]byte(defaultAuditPolicy)); err != nil {
		t.Fatal(err)
	}
}
