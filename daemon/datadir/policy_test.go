package datadir

import (
	"testing"

	"k8s.io/apiserver/pkg/apis/audit"
	"k8s.io/apiserver/pkg/audit/policy"
	"k8s.io/apiserver/pkg/authentication/user"
	"k8s.io/apiserver/pkg/authorization/authorizer"

	"github.com/sovra-dev/sovra/daemon/auditpolicy"
	"github.com/sovra-dev/sovra/daemon/capi"
	"github.com/sovra-dev/sovra/daemon/identity"
)

// TestDefaultAuditPolicyKeepsSaltsOut: the default policy passes the check
// an operator's policy must pass.
func TestDefaultAuditPolicyKeepsSaltsOut(t *testing.T) {
	if err := auditpolicy.CheckBytes([]byte(defaultAuditPolicy)); err != nil {
		t.Fatal(err)
	}
}

// TestDefaultAuditPolicyLevels: lease renewals and the components' reads
// are not recorded; the components' writes, bootstrap leases and every
// request on a SovraNode are, under the user who made them.
func TestDefaultAuditPolicyLevels(t *testing.T) {
	p, err := policy.LoadPolicyFromBytes([]byte(defaultAuditPolicy))
	if err != nil {
		t.Fatal(err)
	}
	eval := policy.NewPolicyRuleEvaluator(p)
	component := func(name string) user.Info {
		return &user.DefaultInfo{Name: name, Groups: []string{identity.Group, user.AllAuthenticated}}
	}
	apiserver := &user.DefaultInfo{Name: user.APIServerUser, Groups: []string{user.SystemPrivilegedGroup}}
	admin := &user.DefaultInfo{Name: "sovra-admin", Groups: []string{user.SystemPrivilegedGroup}}
	lease := func(u user.Info, verb, ns, name string) authorizer.AttributesRecord {
		return authorizer.AttributesRecord{User: u, Verb: verb, APIGroup: "coordination.k8s.io", Resource: "leases",
			Namespace: ns, Name: name, ResourceRequest: true}
	}
	node := func(u user.Info, verb, sub string) authorizer.AttributesRecord {
		return authorizer.AttributesRecord{User: u, Verb: verb, APIGroup: "sovra.dev", Resource: "sovranodes",
			Subresource: sub, Name: "ek-1", ResourceRequest: true}
	}
	for _, tc := range []struct {
		name  string
		attrs authorizer.AttributesRecord
		want  audit.Level
	}{
		{"leader Lease renewal", lease(component(identity.CAPI), "update", capi.Namespace, capi.LeaseName), audit.LevelNone},
		{"API server identity lease renewal", lease(apiserver, "update", "kube-system", "apiserver-x"), audit.LevelNone},
		{"leader Lease taken", lease(component(identity.CAPI), "create", capi.Namespace, capi.LeaseName), audit.LevelMetadata},
		{"bootstrap lease renewal", lease(component(identity.NodeAPI), "update", capi.Namespace, "bootstrap-prod"), audit.LevelMetadata},
		{"salt write", node(component(identity.KMS), "update", "status"), audit.LevelMetadata},
		{"node read by a component", node(component(identity.NodeAPI), "get", ""), audit.LevelMetadata},
		{"node read by the admin", node(admin, "get", ""), audit.LevelMetadata},
		{"secret read by a component", authorizer.AttributesRecord{User: component(identity.CAPI), Verb: "list",
			Resource: "secrets", Namespace: "default", ResourceRequest: true}, audit.LevelNone},
		{"event by a component", authorizer.AttributesRecord{User: component(identity.KMS), Verb: "create",
			Resource: "events", Namespace: "default", ResourceRequest: true}, audit.LevelNone},
		{"service account by the controllers", authorizer.AttributesRecord{User: component(identity.Controllers), Verb: "create",
			Resource: "serviceaccounts", Namespace: "team-a", ResourceRequest: true}, audit.LevelMetadata},
		{"cluster by Cluster API", authorizer.AttributesRecord{User: component(identity.CAPI), Verb: "patch",
			APIGroup: "cluster.x-k8s.io", Resource: "clusters", Namespace: "default", Name: "c", ResourceRequest: true}, audit.LevelRequestResponse},
		{"discovery", authorizer.AttributesRecord{User: component(identity.Controllers), Verb: "get", Path: "/apis/cluster.x-k8s.io/v1beta1"}, audit.LevelNone},
	} {
		if got := eval.EvaluatePolicyRule(tc.attrs).Level; got != tc.want {
			t.Errorf("%s: level %s, want %s", tc.name, got, tc.want)
		}
	}
}
