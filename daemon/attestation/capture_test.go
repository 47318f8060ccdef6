package attestation

import (
	"errors"
	"reflect"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
)

func referenceNode() *v1alpha1.SovraNode {
	n := &v1alpha1.SovraNode{ObjectMeta: metav1.ObjectMeta{Name: "ek-0123", Labels: map[string]string{"sovra.dev/cluster": "prod"}}}
	n.Status.LastAttestationResult = v1alpha1.ResultPassed
	meta.SetStatusCondition(&n.Status.Conditions, metav1.Condition{Type: v1alpha1.ConditionAttested, Status: metav1.ConditionTrue, Reason: v1alpha1.ReasonAttestationPassed})
	n.Status.PCRs = map[string]string{}
	for _, i := range []string{"0", "1", "2", "3", "4", "5", "6", "7", "11", "12"} {
		n.Status.PCRs[i] = strings.Repeat(i[:1], 64)
	}
	n.Status.PCRs["7"] = strings.Repeat("AB", 32)
	n.Status.Claims = map[string]string{
		"secureboot": "enabled", "kernel.lockdown": "error: no securityfs", "lsm.selinux": "enforcing",
		"talos.version": "v1.13.0", "extension/sovra-agent": "v0.1.0", "custom": "x",
		"nodekey.sha256": "ab", "boot.id": "b1", "boot.started": "1700000000",
	}
	return n
}

func TestCapturePolicy(t *testing.T) {
	sel, err := ParseNodeSelector("sovra.dev/cluster=prod")
	if err != nil {
		t.Fatal(err)
	}
	p, notes, err := CapturePolicy(referenceNode(), CaptureOptions{Selector: sel})
	if err != nil {
		t.Fatal(err)
	}
	if p.Name != "captured-ek-0123" || p.Annotations[AnnotationCapturedFrom] != "ek-0123" || p.Kind != "AttestationPolicy" {
		t.Errorf("policy %s %v %s", p.Name, p.Annotations, p.Kind)
	}
	var idx []int
	for _, r := range p.Spec.PCRs {
		idx = append(idx, r.Index)
		if r.Mode != v1alpha1.ModeWarn || len(r.Values) != 1 || !pcrValuePattern.MatchString(r.Values[0]) {
			t.Errorf("PCR rule %+v", r)
		}
	}
	if !reflect.DeepEqual(idx, PolicyPCRs) {
		t.Errorf("PCR rules on %v, want %v (12 is not quoted)", idx, PolicyPCRs)
	}
	if p.Spec.PCRs[7].Values[0] != strings.Repeat("ab", 32) {
		t.Errorf("PCR 7 value %s, want lower case", p.Spec.PCRs[7].Values[0])
	}
	var names []string
	for _, r := range p.Spec.Claims {
		names = append(names, r.Name)
	}
	if want := []string{"extension/sovra-agent", "lsm.selinux", "secureboot", "talos.version"}; !reflect.DeepEqual(names, want) {
		t.Errorf("claim rules %v, want %v", names, want)
	}
	if all := strings.Join(notes, "\n"); !strings.Contains(all, "kernel.lockdown left out") {
		t.Errorf("notes %q do not say the unreadable claim was left out", all)
	}

	// Asked for by name; the per-boot claims are refused outright.
	p, _, err = CapturePolicy(referenceNode(), CaptureOptions{Mode: v1alpha1.ModeEnforce, Claims: []string{"custom"}, PCRs: []int{7}})
	if err != nil || len(p.Spec.Claims) != 1 || p.Spec.Claims[0].Name != "custom" || len(p.Spec.PCRs) != 1 || p.Spec.PCRs[0].Mode != v1alpha1.ModeEnforce {
		t.Fatalf("explicit capture: %+v, %v", p, err)
	}
	for _, o := range []CaptureOptions{{Claims: []string{"boot.id"}}, {PCRs: []int{12}}, {Mode: "Audit"}, {Name: "Not_A_Name"}} {
		if _, _, err := CapturePolicy(referenceNode(), o); err == nil || errors.Is(err, ErrNotReference) {
			t.Errorf("options %+v: %v, want a usage error", o, err)
		}
	}
}

func TestCaptureRefusesNonReference(t *testing.T) {
	failed := referenceNode()
	failed.Status.LastAttestationResult, failed.Status.Reason = v1alpha1.ResultFailed, v1alpha1.ReasonPolicyViolation
	meta.SetStatusCondition(&failed.Status.Conditions, metav1.Condition{Type: v1alpha1.ConditionAttested, Status: metav1.ConditionFalse, Reason: v1alpha1.ReasonPolicyViolation})
	fresh := referenceNode()
	fresh.Status.LastAttestationResult = ""
	quarantined := referenceNode()
	meta.SetStatusCondition(&quarantined.Status.Conditions, metav1.Condition{Type: v1alpha1.ConditionQuarantined, Status: metav1.ConditionTrue, Reason: "UnexpectedUnseal"})
	for name, n := range map[string]*v1alpha1.SovraNode{"failed": failed, "never attested": fresh, "quarantined": quarantined} {
		if _, _, err := CapturePolicy(n, CaptureOptions{}); !errors.Is(err, ErrNotReference) {
			t.Errorf("%s: %v, want ErrNotReference", name, err)
		}
	}
}

func TestParseNodeSelector(t *testing.T) {
	sel, err := ParseNodeSelector("sovra.dev/cluster=prod,tier in (a,b),!legacy,env!=dev")
	if err != nil {
		t.Fatal(err)
	}
	if sel.MatchLabels["sovra.dev/cluster"] != "prod" || len(sel.MatchExpressions) != 3 {
		t.Fatalf("selector %+v", sel)
	}
	if s, err := ParseNodeSelector(""); s != nil || err != nil {
		t.Errorf("empty selector: %v, %v", s, err)
	}
	if _, err := ParseNodeSelector("gen>2"); err == nil {
		t.Error("a selector a policy cannot hold was accepted")
	}
}
