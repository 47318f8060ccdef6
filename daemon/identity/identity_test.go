package identity

import (
	"crypto/x509"
	"encoding/pem"
	"slices"
	"testing"

	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apiserver/pkg/authorization/authorizer"
	"k8s.io/client-go/rest"
	"k8s.io/kubernetes/plugin/pkg/auth/authorizer/rbac"

	"github.com/sovra-dev/sovra/daemon/pki"
)

// TestClientConfig: a component's configuration reaches the server as
// loopback does, with a client certificate from the CA naming the
// component, and without the loopback token.
func TestClientConfig(t *testing.T) {
	ca, err := pki.EnsureCA(t.TempDir(), "test-ca")
	if err != nil {
		t.Fatal(err)
	}
	loopback := &rest.Config{Host: "https://127.0.0.1:6443", BearerToken: "superuser",
		TLSClientConfig: rest.TLSClientConfig{ServerName: "apiserver-loopback-client", CAData: []byte("loopback CA")}}
	c, err := NewClients(loopback, ca)
	if err != nil {
		t.Fatal(err)
	}
	for user, cfg := range map[string]*rest.Config{CAPI: c.CAPI, KMS: c.KMS, NodeAPI: c.NodeAPI, Shred: c.Shred, Controllers: c.Controllers,
		Hosts: c.Hosts, Infrastructure: c.Infrastructure} {
		if cfg.BearerToken != "" || cfg.Host != loopback.Host || cfg.ServerName != loopback.ServerName || string(cfg.CAData) != "loopback CA" {
			t.Errorf("%s: %+v", user, cfg)
		}
		block, _ := pem.Decode(cfg.CertData)
		if block == nil {
			t.Fatalf("%s: no certificate", user)
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		if err := cert.CheckSignatureFrom(ca.Cert); err != nil {
			t.Errorf("%s: not signed by the CA: %v", user, err)
		}
		if cert.Subject.CommonName != user || !slices.Equal(cert.Subject.Organization, []string{Group}) ||
			!slices.Equal(cert.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}) {
			t.Errorf("%s: certificate for %v", user, cert.Subject)
		}
	}
	if loopback.BearerToken != "superuser" {
		t.Fatal("the loopback configuration was changed")
	}
}

// TestLeastPrivilege: each component's own roles allow what it does and
// nothing that would let it reach beyond its part.
func TestLeastPrivilege(t *testing.T) {
	objs, err := Objects(nil)
	if err != nil {
		t.Fatal(err)
	}
	rules := map[string][]rbacv1.PolicyRule{}
	roles := map[string][]rbacv1.PolicyRule{}
	for _, o := range objs {
		switch r := o.(type) {
		case *rbacv1.ClusterRole:
			roles["ClusterRole/"+r.Name] = r.Rules
		case *rbacv1.Role:
			roles["Role/"+r.Namespace+"/"+r.Name] = r.Rules
		}
	}
	for _, o := range objs {
		switch b := o.(type) {
		case *rbacv1.ClusterRoleBinding:
			rules[b.Subjects[0].Name] = append(rules[b.Subjects[0].Name], roles["ClusterRole/"+b.RoleRef.Name]...)
		case *rbacv1.RoleBinding:
			key := b.Subjects[0].Name + " in " + b.Namespace
			rules[key] = append(rules[key], roles["Role/"+b.Namespace+"/"+b.RoleRef.Name]...)
		}
	}
	req := func(verb, group, resource, sub, ns, name string) authorizer.AttributesRecord {
		return authorizer.AttributesRecord{Verb: verb, APIGroup: group, Resource: resource, Subresource: sub,
			Namespace: ns, Name: name, ResourceRequest: true}
	}
	for _, tc := range []struct {
		user  string
		attrs authorizer.AttributesRecord
		allow bool
	}{
		{KMS, req("update", "sovra.dev", "sovranodes", "status", "", "ek-1"), true},
		{KMS, req("create", "sovra.dev", "unsealledgers", "", "", "l"), true},
		{KMS, req("create", "", "events", "", "default", ""), true},
		{KMS, req("get", "", "secrets", "", "default", "s"), false},
		{KMS, req("update", "sovra.dev", "attestationpolicies", "", "", "p"), false},
		{KMS, req("create", "apiextensions.k8s.io", "customresourcedefinitions", "", "", ""), false},
		{NodeAPI, req("create", "sovra.dev", "sovranodes", "", "", ""), true},
		{NodeAPI, req("create", "sovra.dev", "attestationnonces", "", "", ""), true},
		{NodeAPI, req("update", "coordination.k8s.io", "leases", "", Namespace, "bootstrap-prod"), true},
		{NodeAPI, req("update", "coordination.k8s.io", "leases", "", "kube-system", "x"), false},
		{NodeAPI, req("delete", "sovra.dev", "sovranodes", "", "", "ek-1"), false},
		{NodeAPI, req("update", "sovra.dev", "attestationpolicies", "", "", "p"), false},
		{NodeAPI, req("create", "", "namespaces", "", "", ""), false},
		{NodeAPI, req("get", "", "namespaces", "", "", Namespace), true},
		{Shred, req("update", "sovra.dev", "sovranodes", "status", "", "ek-1"), true},
		{Shred, req("create", "sovra.dev", "sovranodes", "", "", ""), false},
		{Shred, req("list", "", "secrets", "", "", ""), false},
		{Controllers, req("delete", "certificates.k8s.io", "certificatesigningrequests", "", "", "c"), true},
		{Controllers, req("update", "certificates.k8s.io", "certificatesigningrequests", "approval", "", "c"), false},
		{CAPI, req("update", "coordination.k8s.io", "leases", "", Namespace, "sovrad-controllers"), true},
		{CAPI, req("list", "sovra.dev", "sovranodes", "", "", ""), true},
		{CAPI, req("update", "sovra.dev", "sovranodes", "status", "", "ek-1"), false},
		// The manager's cache serves the host pool's and the provider's cached reads.
		{CAPI, req("watch", "sovra.dev", "hosts", "", "", ""), true},
		{CAPI, req("update", "sovra.dev", "hosts", "", "", "ek-1"), false},
		{CAPI, req("update", "sovra.dev", "hosts", "status", "", "ek-1"), false},
		{CAPI, req("create", "admissionregistration.k8s.io", "validatingwebhookconfigurations", "", "", "evil"), false},
		{CAPI, req("create", "rbac.authorization.k8s.io", "clusterrolebindings", "", "", ""), false},
		{Hosts, req("create", "sovra.dev", "hosts", "", "", "ek-1"), true},
		{Hosts, req("update", "sovra.dev", "hosts", "status", "", "ek-1"), true},
		{Hosts, req("get", "", "secrets", "", "prod", "prod-cp-bootstrap"), true},
		{Hosts, req("create", "", "secrets", "", Namespace, "agent-ca-ek-1"), true},
		{Hosts, req("create", "", "secrets", "", "prod", "s"), false},
		{Hosts, req("list", "", "secrets", "", "", ""), false},
		{Hosts, req("delete", "sovra.dev", "hosts", "", "", "ek-1"), false},
		{Hosts, req("update", "sovra.dev", "sovranodes", "status", "", "ek-1"), false},
		{Hosts, req("update", "infrastructure.cluster.x-k8s.io", "sovramachines", "", "prod", "m"), false},
		{Infrastructure, req("patch", "infrastructure.cluster.x-k8s.io", "sovramachines", "status", "prod", "m"), true},
		{Infrastructure, req("update", "sovra.dev", "hosts", "", "", "ek-1"), true},
		{Infrastructure, req("update", "sovra.dev", "sovranodes", "status", "", "ek-1"), true},
		{Infrastructure, req("watch", "sovra.dev", "sovranodes", "", "", ""), true},
		{Infrastructure, req("watch", "cluster.x-k8s.io", "machines", "", "", ""), true},
		{Infrastructure, req("update", "cluster.x-k8s.io", "machines", "", "prod", "m"), false},
		{Infrastructure, req("get", "", "secrets", "", "prod", "s"), false},
		{Infrastructure, req("create", "sovra.dev", "hosts", "", "", ""), false},
		{Infrastructure, req("delete", "sovra.dev", "sovranodes", "", "", "ek-1"), false},
		{Infrastructure, req("update", "sovra.dev", "sovranodes", "", "", "ek-1"), true},
		{Infrastructure, req("create", "sovra.dev", "sovranodes", "", "", ""), false},
		{Infrastructure, req("update", "coordination.k8s.io", "leases", "", Namespace, "bootstrap-prod"), false},
		{Hosts, req("get", "controlplane.cluster.x-k8s.io", "taloscontrolplanes", "", "prod", "prod-cp"), true},
		{Hosts, req("update", "controlplane.cluster.x-k8s.io", "taloscontrolplanes", "", "prod", "prod-cp"), false},
		{Hosts, req("update", "sovra.dev", "sovranodes", "", "", "ek-1"), false},
		{KMS, req("create", "sovra.dev", "uuidclaims", "", "", "u"), true},
		{KMS, req("update", "sovra.dev", "hosts", "", "", "ek-1"), false},
	} {
		got := rbac.RulesAllow(tc.attrs, rules[tc.user]...) ||
			tc.attrs.Namespace != "" && rbac.RulesAllow(tc.attrs, rules[tc.user+" in "+tc.attrs.Namespace]...)
		if got != tc.allow {
			t.Errorf("%s %s %s/%s %s/%s: allowed %v, want %v", tc.user, tc.attrs.Verb, tc.attrs.Resource, tc.attrs.Subresource,
				tc.attrs.Namespace, tc.attrs.Name, got, tc.allow)
		}
	}
	for _, user := range Users {
		if len(rules[user]) == 0 {
			t.Errorf("%s has no role of its own", user)
		}
	}
}
