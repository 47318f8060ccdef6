// Package auditpolicy checks that an audit policy keeps SovraNodes out of
// the audit log's request and response bodies. A SovraNode holds the node's
// key salt; with the daemon's master key the salt opens every key the node
// sealed, and a record of it in the audit log (kept for 30 days) would
// outlive the node's revocation. The policy is read and evaluated with the
// API server's own audit policy loader and rule evaluator, so the check
// judges exactly what the API server will do.
package auditpolicy

import (
	"fmt"
	"slices"
	"strings"

	"k8s.io/apiserver/pkg/apis/audit"
	"k8s.io/apiserver/pkg/audit/policy"
	"k8s.io/apiserver/pkg/authentication/user"
	"k8s.io/apiserver/pkg/authorization/authorizer"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
)

const (
	// nodeResource is the SovraNode resource; statusSubresource is the only
	// subresource it has, and the one the salt is written through.
	nodeResource      = "sovranodes"
	statusSubresource = "status"
	// anyUser and anyName stand for a user and a record name that no rule
	// names.
	anyUser = "sovra:audit-policy-check"
	anyName = "sovra-audit-policy-check"

	// Fix is the rule that keeps SovraNodes at Metadata, as an item of a
	// policy's rules; it must come before any rule that would record them
	// with a body.
	Fix = `  - level: Metadata
    resources:
      - group: "sovra.dev"
        resources: ["sovranodes", "sovranodes/*"]`
)

// verbs are every verb a request on a SovraNode can have: reads return the
// record, writes carry and return it, and a delete returns it too.
var verbs = []string{"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}

// Check reads the audit policy file at path as the API server does and
// fails when it is invalid, or when any request on SovraNodes (any verb,
// the status subresource too, by any user) would be recorded above
// Metadata. The error says which request and rule, and what to add.
func Check(path string) error {
	p, err := policy.LoadPolicyFromFile(path)
	if err != nil {
		return err
	}
	return check(p)
}

// CheckBytes is Check on a policy document.
func CheckBytes(data []byte) error {
	p, err := policy.LoadPolicyFromBytes(data)
	if err != nil {
		return err
	}
	return check(p)
}

func check(p *audit.Policy) error {
	eval := policy.NewPolicyRuleEvaluator(p)
	for _, u := range users(p) {
		for _, name := range names(p) {
			for _, sub := range []string{"", statusSubresource} {
				for _, verb := range verbs {
					attrs := request(u, verb, sub, name)
					level := eval.EvaluatePolicyRule(attrs).Level
					if level.Less(audit.LevelRequest) {
						continue
					}
					rule := deciding(p, attrs)
					return fmt.Errorf("rule %d records SovraNodes at level %s (%s): "+
						"a node's key salt would stay in the audit log after the node is revoked; "+
						"put this rule before rule %d:\n%s", rule, level, describe(attrs), rule, Fix)
				}
			}
		}
	}
	return nil
}

// users are the users a rule can tell apart: for every rule, each user it
// names (or one it does not name) in each group it names (or in none).
// Rules match a user by name and by any one group, so a user with fewer
// groups matches fewer earlier rules: if any user reaches a rule, one of
// these does too.
func users(p *audit.Policy) []user.Info {
	out := []user.Info{&user.DefaultInfo{Name: anyUser}}
	for _, r := range p.Rules {
		names := r.Users
		if len(names) == 0 {
			names = []string{anyUser}
		}
		for _, n := range names {
			if len(r.UserGroups) == 0 {
				out = append(out, &user.DefaultInfo{Name: n})
			}
			for _, g := range r.UserGroups {
				out = append(out, &user.DefaultInfo{Name: n, Groups: []string{g}})
			}
		}
	}
	return out
}

// names are the record names a rule can tell apart: those rules name, and
// one they do not (and none, for a list).
func names(p *audit.Policy) []string {
	out := []string{"", anyName}
	for _, r := range p.Rules {
		for _, gr := range r.Resources {
			for _, n := range gr.ResourceNames {
				if !slices.Contains(out, n) {
					out = append(out, n)
				}
			}
		}
	}
	return out
}

func request(u user.Info, verb, subresource, name string) authorizer.AttributesRecord {
	return authorizer.AttributesRecord{
		User:            u,
		Verb:            verb,
		APIGroup:        v1alpha1.GroupVersion.Group,
		APIVersion:      v1alpha1.GroupVersion.Version,
		Resource:        nodeResource,
		Subresource:     subresource,
		Name:            name,
		ResourceRequest: true,
	}
}

// deciding is the 1-based number of the rule that decides attrs: the
// first rule that, alone, records it with a body. (Any rule before it that
// matched would have decided instead.)
func deciding(p *audit.Policy, attrs authorizer.Attributes) int {
	for i, r := range p.Rules {
		one := policy.NewPolicyRuleEvaluator(&audit.Policy{Rules: []audit.PolicyRule{r}})
		if !one.EvaluatePolicyRule(attrs).Level.Less(audit.LevelRequest) {
			return i + 1
		}
	}
	return 0
}

// describe names the request attrs stands for.
func describe(attrs authorizer.AttributesRecord) string {
	res := attrs.Resource
	if attrs.Subresource != "" {
		res += "/" + attrs.Subresource
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s", attrs.Verb, res)
	if attrs.Name != "" && attrs.Name != anyName {
		fmt.Fprintf(&b, " %s", attrs.Name)
	}
	if attrs.User.GetName() != anyUser {
		fmt.Fprintf(&b, " by user %s", attrs.User.GetName())
	}
	if g := attrs.User.GetGroups(); len(g) > 0 {
		fmt.Fprintf(&b, " in group %s", g[0])
	}
	return b.String()
}
