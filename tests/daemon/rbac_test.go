package daemon_test

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sovra-dev/sovra/tests/sovradtest"
)

// TestBuiltInRolesAndNamespaces: the upstream controllers sovrad runs make
// the API behave as any Kubernetes API does for a user. The built-in edit
// role is filled by aggregation, so a user bound to it in one namespace can
// work there (a ConfigMap, a Secret) and nowhere else; every namespace gets
// its default ServiceAccount, whose token works, and kube-root-ca.crt with
// the CA that verifies the API.
func TestBuiltInRolesAndNamespaces(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	d := sovradtest.Start(t, dir)
	d.Kubectl("create", "namespace", "team-a")
	d.Kubectl("create", "namespace", "team-b")

	kc := userKubeconfig(t, d, "carol", "contractors")
	as := func(args ...string) (string, error) {
		return sovradtest.Kubectl(t, append([]string{"--kubeconfig", kc}, args...)...)
	}
	if _, err := as("-n", "team-a", "create", "configmap", "before", "--from-literal=k=v"); err == nil ||
		!strings.Contains(err.Error(), `User "carol" cannot create resource "configmaps"`) {
		t.Fatalf("carol created a ConfigMap before any grant: %v", err)
	}
	d.Kubectl("-n", "team-a", "create", "rolebinding", "carol-edits", "--clusterrole=edit", "--user=carol")
	waitFor(t, func() bool {
		_, err := as("-n", "team-a", "create", "configmap", "settings", "--from-literal=k=v")
		return err == nil
	})
	if out, err := as("-n", "team-a", "get", "configmap", "settings", "-o", "jsonpath={.data.k}"); err != nil || out != "v" {
		t.Fatalf("carol reads her ConfigMap: %q, %v", out, err)
	}
	if _, err := as("-n", "team-a", "create", "secret", "generic", "token", "--from-literal=k=v"); err != nil {
		t.Fatalf("edit lets carol create a Secret in team-a: %v", err)
	}
	for _, refused := range [][]string{
		{"-n", "team-b", "create", "configmap", "settings", "--from-literal=k=v"},
		{"-n", "default", "get", "configmaps"},
		{"create", "namespace", "carols"},
		{"get", "secrets", "-A"},
		{"-n", "team-a", "create", "rolebinding", "escalate", "--clusterrole=admin", "--user=carol"},
		{"get", "clusterroles"},
	} {
		if out, err := as(refused...); err == nil || !strings.Contains(strings.ToLower(err.Error()), "forbidden") {
			t.Errorf("carol, bound to edit in team-a only: kubectl %s: %q, %v", strings.Join(refused, " "), out, err)
		}
	}

	// Every namespace, old and new, gets the default ServiceAccount and the
	// CA bundle of the API.
	ca := mustRead(t, filepath.Join(dir, "ca.crt"))
	for _, ns := range []string{"default", "team-a", "team-b"} {
		waitFor(t, func() bool {
			_, err := d.TryKubectl("-n", ns, "get", "serviceaccount", "default")
			return err == nil
		})
		waitFor(t, func() bool {
			out, err := d.TryKubectl("-n", ns, "get", "configmap", "kube-root-ca.crt", "-o", `jsonpath={.data.ca\.crt}`)
			return err == nil && bytes.Equal(bytes.TrimSpace([]byte(out)), bytes.TrimSpace(ca))
		})
	}
	// The default ServiceAccount's token, bound to view, reads team-b.
	d.Kubectl("-n", "team-b", "create", "rolebinding", "default-views", "--clusterrole=view", "--serviceaccount=team-b:default")
	token := strings.TrimSpace(d.Kubectl("-n", "team-b", "create", "token", "default"))
	waitFor(t, func() bool {
		out, err := tryKubectlAs(t, d, "--token", token, "-n", "team-b", "get", "configmap", "kube-root-ca.crt", "-o", "name")
		return err == nil && out == "configmap/kube-root-ca.crt\n"
	})
	if _, err := tryKubectlAs(t, d, "--token", token, "-n", "team-b", "create", "configmap", "x"); err == nil {
		t.Fatal("view let the default ServiceAccount create a ConfigMap")
	}
}
