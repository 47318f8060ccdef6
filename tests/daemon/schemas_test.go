package daemon_test

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/tests/sovradtest"
)

const (
	// typeCheckTimeout bounds the waits for the OpenAPI documents of new
	// CRDs and for a policy's type-checking status.
	typeCheckTimeout = 30 * time.Second
	// schemaRef starts every reference an OpenAPI v3 document makes to its
	// own schemas.
	schemaRef = "#/components/schemas/"
)

// admissionPolicy is a ValidatingAdmissionPolicy on resource of group (at
// version) whose one expression reads a field the type does not have.
const admissionPolicy = `apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata:
  name: %[1]s
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - apiGroups: ["%[2]s"]
      apiVersions: ["%[3]s"]
      operations: ["CREATE", "UPDATE"]
      resources: ["%[4]s"]
  validations:
  - expression: "object.spec.%[5]s == 1"
`

// TestSchemas: the API serves the OpenAPI documents clients rely on, and the
// ValidatingAdmissionPolicy status controller type-checks policies with them.
//
// Every OpenAPI v3 document the API lists is served whole (each schema it
// refers to is in it), built-in groups and CRDs alike, and kubectl explains
// both from them. The controller type-checks a policy's expressions against
// the schemas of the types it matches, a built-in type and a CRD, and writes
// what it found into the policy's status, as kubectl shows it: a controller
// that cannot resolve a schema writes no warning (the expression is then
// untyped), so each policy must carry the warning that names its missing
// field.
func TestSchemas(t *testing.T) {
	d := sovradtest.Start(t, filepath.Join(t.TempDir(), "data"))
	d.WaitEstablished("clusters.cluster.x-k8s.io")

	// A CRD's document is listed a moment after the CRD is established.
	var discovery struct {
		Paths map[string]json.RawMessage `json:"paths"`
	}
	listed := func() []string {
		var missing []string
		for _, want := range []string{"api/v1", "apis/rbac.authorization.k8s.io/v1", "apis/apiextensions.k8s.io/v1", "apis/cluster.x-k8s.io/v1beta1"} {
			if _, ok := discovery.Paths[want]; !ok {
				missing = append(missing, want)
			}
		}
		return missing
	}
	for deadline := time.Now().Add(typeCheckTimeout); ; time.Sleep(200 * time.Millisecond) {
		if err := json.Unmarshal([]byte(d.Kubectl("get", "--raw", "/openapi/v3")), &discovery); err != nil {
			t.Fatalf("decoding the OpenAPI v3 discovery: %v", err)
		}
		if missing := listed(); len(missing) == 0 {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("/openapi/v3 does not list %s after %s", missing, typeCheckTimeout)
		}
	}
	for path := range discovery.Paths {
		if !strings.HasPrefix(path, "api") {
			continue // /version, /.well-known/...: no schemas
		}
		checkComplete(t, path, d.Kubectl("get", "--raw", "/openapi/v3/"+path))
	}
	for _, field := range []string{"configmap.data", "cluster.spec.controlPlaneEndpoint"} {
		if out := d.Kubectl("explain", field); !strings.Contains(out, "FIELD:") {
			t.Errorf("kubectl explain %s:\n%s", field, out)
		}
	}

	for _, p := range []struct{ name, group, version, resource, field, warning string }{
		// A ConfigMap has no spec at all.
		{"configmap-spec", "", "v1", "configmaps", "replicas", "undefined field 'spec'"},
		{"cluster-typo", "cluster.x-k8s.io", "v1beta1", "clusters", "controlPlaneEndpont", "undefined field 'controlPlaneEndpont'"},
	} {
		apply(t, d, fmt.Sprintf(admissionPolicy, p.name, p.group, p.version, p.resource, p.field))
		var got string
		for deadline := time.Now().Add(typeCheckTimeout); !strings.Contains(got, p.warning); time.Sleep(200 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("policy %s: type-checking warnings %q after %s, want one with %q", p.name, got, typeCheckTimeout, p.warning)
			}
			got, _ = d.TryKubectl("get", "validatingadmissionpolicy", p.name, "-o", "jsonpath={.status.typeChecking.expressionWarnings[*].warning}")
		}
	}
}

// checkComplete fails t unless the OpenAPI v3 document doc (at path) has
// schemas and every schema it refers to.
func checkComplete(t *testing.T, path, doc string) {
	t.Helper()
	var parsed map[string]any
	if err := json.Unmarshal([]byte(doc), &parsed); err != nil {
		t.Errorf("decoding /openapi/v3/%s: %v", path, err)
		return
	}
	components, _ := parsed["components"].(map[string]any)
	schemas, _ := components["schemas"].(map[string]any)
	if len(schemas) == 0 {
		t.Errorf("/openapi/v3/%s has no schemas", path)
	}
	refs := 0
	var missing []string
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			if ref, ok := v["$ref"].(string); ok {
				refs++
				name := strings.NewReplacer("~1", "/", "~0", "~").Replace(strings.TrimPrefix(ref, schemaRef))
				if _, found := schemas[name]; !strings.HasPrefix(ref, schemaRef) || !found {
					missing = append(missing, ref)
				}
			}
			for _, e := range v {
				walk(e)
			}
		case []any:
			for _, e := range v {
				walk(e)
			}
		}
	}
	walk(parsed)
	if refs == 0 {
		t.Errorf("/openapi/v3/%s refers to no schema", path)
	}
	if len(missing) > 0 {
		sort.Strings(missing)
		t.Errorf("/openapi/v3/%s refers to %d schemas it does not have, first %s", path, len(missing), missing[0])
	}
}
