package attest

import (
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"k8s.io/apimachinery/pkg/api/meta"

	agentattest "github.com/sovra-dev/sovra/agent/attest"
	ctrlattestation "github.com/sovra-dev/sovra/agent/controllers/attestation"
	"github.com/sovra-dev/sovra/agent/controllers/ctest"
	"github.com/sovra-dev/sovra/agent/resources/attestation"
	"github.com/sovra-dev/sovra/agent/runtime/clock"
	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/tests/swtpmlab"
)

// TestControllerAgainstDaemon runs the agent's attestation controller in the
// COSI runtime with swtpm against the built sovrad's node API: the node
// enrolls, attests, and both sides record it.
func TestControllerAgainstDaemon(t *testing.T) {
	l := newSwtpmLab(t)
	d := startDaemon(t, l.ekFlags(t)...)
	tpm, log := l.use(t, 0)
	a := &agentattest.Agent{TPM: tpm, Client: d.api, Claims: swtpmlab.NodeRoot(t), EventLogPath: log,
		Node: agentattest.Node{UUID: newUUID(), Hostname: "cp-2"}, Logger: zaptest.NewLogger(t)}
	st := ctest.Start(t, &ctrlattestation.AttestationController{
		Attester: a, Clock: clock.Real{}, Interval: time.Hour,
	})
	s := ctest.WaitFor(t, st, attestation.NewStatus().Metadata(), func(s *attestation.Status) bool {
		return s.TypedSpec().Phase == attestation.PhaseAttested
	})
	n := d.node(t, s.TypedSpec().Node)
	if !meta.IsStatusConditionTrue(n.Status.Conditions, v1alpha1.ConditionAttested) {
		t.Fatalf("daemon record not attested: %+v", n.Status)
	}
	if a.Credential() == nil {
		t.Fatal("agent holds no node credential")
	}
	t.Logf("agent status: %+v", s.TypedSpec())
}
