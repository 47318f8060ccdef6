package datadir

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/sovra-dev/sovra/daemon/config"
)

// defaultAuditPolicy records who did what to which object for everything,
// the full request and response for Cluster API and sovra.dev objects (the
// lifecycle an auditor asks about), and never the content of Secrets,
// ConfigMaps, token requests or SovraNodes (whose key salt must go when the
// node is revoked; package auditpolicy checks an operator's policy for it).
// The SovraNodes rule comes first, so that no rule can record them
// otherwise and every read of one is recorded, whoever reads. Not recorded:
// read-only health and discovery probes, lease renewals (the API server's
// own leases and the controllers' leader Lease, renewed every few seconds),
// and the reads and events of the API server itself and of sovrad's
// components (group system:sovra:components, package identity), whose
// writes are recorded under their own user.
const defaultAuditPolicy = `apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    resources:
      - group: "sovra.dev"
        resources: ["sovranodes", "sovranodes/*"]
  - level: None
    nonResourceURLs: ["/healthz*", "/livez*", "/readyz*", "/version", "/openapi*", "/api", "/api/*", "/apis", "/apis/*", "/metrics"]
  - level: None
    users: ["system:apiserver"]
    verbs: ["get", "update"]
    namespaces: ["kube-system"]
    resources:
      - group: "coordination.k8s.io"
        resources: ["leases"]
  - level: None
    users: ["system:sovra:capi"]
    verbs: ["get", "update"]
    namespaces: ["sovra-system"]
    resources:
      - group: "coordination.k8s.io"
        resources: ["leases"]
        resourceNames: ["sovrad-controllers"]
  - level: None
    users: ["system:apiserver"]
    verbs: ["get", "list", "watch"]
  - level: None
    userGroups: ["system:sovra:components"]
    verbs: ["get", "list", "watch"]
  - level: None
    userGroups: ["system:sovra:components"]
    resources:
      - group: ""
        resources: ["events"]
      - group: "events.k8s.io"
        resources: ["events"]
  - level: Metadata
    resources:
      - group: ""
        resources: ["secrets", "configmaps", "serviceaccounts/token"]
      - group: "authentication.k8s.io"
        resources: ["tokenreviews"]
      - group: "authorization.k8s.io"
  - level: RequestResponse
    resources:
      - group: "cluster.x-k8s.io"
      - group: "bootstrap.cluster.x-k8s.io"
      - group: "controlplane.cluster.x-k8s.io"
      - group: "infrastructure.cluster.x-k8s.io"
      - group: "sovra.dev"
  - level: Metadata
`

// Anonymous requests are accepted only on the health endpoints, where RBAC's
// system:public-info-viewer lets them through; everywhere else they get 401.
var anonymousPaths = []string{"/livez", "/readyz", "/healthz"}

// oidcUserRules refuse an OIDC token whose user name or a group, once
// prefixed, starts with system:, which Kubernetes reserves for itself (the
// groups system:masters and system:nodes, the users system:apiserver and
// system:sovra:*): an identity provider that lets users shape a claim must
// not reach them. Expressions on the user info, as the structured
// configuration's userValidationRules take them.
var oidcUserRules = []map[string]string{
	{
		"expression": "!user.username.startsWith('" + config.ReservedPrefix + "')",
		"message":    "OIDC user names must not start with " + config.ReservedPrefix,
	},
	{
		"expression": "user.groups.all(g, !g.startsWith('" + config.ReservedPrefix + "'))",
		"message":    "OIDC groups must not start with " + config.ReservedPrefix,
	},
}

// authenticationConfig renders the API server's structured authentication
// configuration: anonymous access limited to health checks, and OIDC when an
// issuer is configured, with kube-apiserver's prefixes and no reserved
// names. JSON is valid YAML, so the file is JSON.
func authenticationConfig(o config.OIDC) ([]byte, error) {
	type condition struct {
		Path string `json:"path"`
	}
	doc := map[string]any{
		"apiVersion": "apiserver.config.k8s.io/v1beta1",
		"kind":       "AuthenticationConfiguration",
	}
	var conds []condition
	for _, p := range anonymousPaths {
		conds = append(conds, condition{Path: p})
	}
	doc["anonymous"] = map[string]any{"enabled": true, "conditions": conds}

	if o.IssuerURL != "" {
		issuer := map[string]any{"url": o.IssuerURL, "audiences": []string{o.ClientID}}
		if o.CAFile != "" {
			ca, err := os.ReadFile(o.CAFile)
			if err != nil {
				return nil, fmt.Errorf("reading --oidc-ca-file: %w", err)
			}
			issuer["certificateAuthority"] = string(ca)
		}
		mappings := map[string]any{
			"username": map[string]any{"claim": o.UsernameClaim, "prefix": o.EffectiveUsernamePrefix()},
		}
		if o.GroupsClaim != "" {
			mappings["groups"] = map[string]any{"claim": o.GroupsClaim, "prefix": o.GroupsPrefix}
		}
		doc["jwt"] = []any{map[string]any{"issuer": issuer, "claimMappings": mappings, "userValidationRules": oidcUserRules}}
	}
	return json.MarshalIndent(doc, "", "  ")
}
