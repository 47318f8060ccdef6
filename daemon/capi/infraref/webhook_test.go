package infraref

import (
	"context"
	"encoding/json"
	"strings"
	"testing"

	admissionv1 "k8s.io/api/admission/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"
)

const infraAPI = "infrastructure.cluster.x-k8s.io/v1alpha1"

func crd(name string, deleting bool) *apiextensionsv1.CustomResourceDefinition {
	c := &apiextensionsv1.CustomResourceDefinition{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if deleting {
		now := metav1.Now()
		c.DeletionTimestamp, c.Finalizers = &now, []string{"customresourcecleanup.apiextensions.k8s.io"}
	}
	return c
}

func testReader(t *testing.T, objs ...client.Object) client.Reader {
	t.Helper()
	s := runtime.NewScheme()
	if err := apiextensionsv1.AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	return fake.NewClientBuilder().WithScheme(s).WithObjects(objs...).Build()
}

// object is a referring object: kind in group, with the reference at path.
func object(t *testing.T, group, kind string, path []string, apiVersion, refKind string, deleting bool) []byte {
	t.Helper()
	ref := map[string]any{"apiVersion": apiVersion, "kind": refKind, "name": "x"}
	var node any = ref
	for i := len(path) - 1; i >= 0; i-- {
		node = map[string]any{path[i]: node}
	}
	obj := node.(map[string]any)
	obj["apiVersion"], obj["kind"] = group+"/v1beta1", kind
	md := map[string]any{"name": "demo", "namespace": "ns"}
	if deleting {
		md["deletionTimestamp"] = "2026-01-01T00:00:00Z"
	}
	obj["metadata"] = md
	raw, err := json.Marshal(obj)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

func request(group, kind string, op admissionv1.Operation, obj, old []byte) admission.Request {
	req := admission.Request{AdmissionRequest: admissionv1.AdmissionRequest{
		Kind:      metav1.GroupVersionKind{Group: group, Version: "v1beta1", Kind: kind},
		Name:      "demo",
		Namespace: "ns",
		Operation: op,
		Object:    runtime.RawExtension{Raw: obj},
	}}
	if old != nil {
		req.OldObject = runtime.RawExtension{Raw: old}
	}
	return req
}

func TestValidator(t *testing.T) {
	infraRef := []string{"spec", "infrastructureRef"}
	r := testReader(t,
		crd("sovratestclusters.infrastructure.cluster.x-k8s.io", false),
		crd("goneclusters.infrastructure.cluster.x-k8s.io", true))
	v := &Validator{APIReader: r}
	cases := []struct {
		name            string
		group, kind     string
		path            []string
		op              admissionv1.Operation
		apiVersion, ref string
		oldRef          string
		deleting        bool
		allowed         bool
		want            []string
	}{
		{name: "foreign kind without CRD", group: capiGroup, kind: "Cluster", path: infraRef, op: admissionv1.Create,
			apiVersion: "infrastructure.cluster.x-k8s.io/v1beta1", ref: "AzureCluster",
			want: []string{"spec.infrastructureRef.kind", "AzureCluster", "no CustomResourceDefinition azureclusters.infrastructure.cluster.x-k8s.io",
				"SovraCluster, SovraMachine and SovraMachineTemplate", "CRDs installed", "controllers run"}},
		{name: "foreign kind with CRD", group: capiGroup, kind: "Cluster", path: infraRef, op: admissionv1.Create,
			apiVersion: infraAPI, ref: "SovraTestCluster", allowed: true},
		{name: "foreign kind whose CRD is being deleted", group: capiGroup, kind: "Cluster", path: infraRef, op: admissionv1.Create,
			apiVersion: infraAPI, ref: "GoneCluster", want: []string{"is being deleted"}},
		{name: "sovra kind in place", group: capiGroup, kind: "Cluster", path: infraRef, op: admissionv1.Create,
			apiVersion: infraAPI, ref: SovraCluster, allowed: true},
		{name: "sovra cluster kind on a machine", group: capiGroup, kind: "Machine", path: infraRef, op: admissionv1.Create,
			apiVersion: infraAPI, ref: SovraCluster, want: []string{"SovraCluster cannot be used here", "a Machine's spec.infrastructureRef takes a SovraMachine"}},
		{name: "machine kind in a deployment's template", group: capiGroup, kind: "MachineDeployment", path: templateRef, op: admissionv1.Create,
			apiVersion: infraAPI, ref: SovraMachine, want: []string{"spec.template.spec.infrastructureRef.kind", "takes a SovraMachineTemplate"}},
		{name: "template in a machine set", group: capiGroup, kind: "MachineSet", path: templateRef, op: admissionv1.Create,
			apiVersion: infraAPI, ref: SovraMachineTemplate, allowed: true},
		{name: "template in a control plane", group: controlPlaneGroup, kind: "TalosControlPlane", path: []string{"spec", "infrastructureTemplate"},
			op: admissionv1.Create, apiVersion: infraAPI, ref: SovraMachineTemplate, allowed: true},
		{name: "machine in a control plane", group: controlPlaneGroup, kind: "TalosControlPlane", path: []string{"spec", "infrastructureTemplate"},
			op: admissionv1.Create, apiVersion: infraAPI, ref: SovraMachine, want: []string{"spec.infrastructureTemplate.kind"}},
		{name: "machine pool", group: capiGroup, kind: "MachinePool", path: templateRef, op: admissionv1.Create,
			apiVersion: infraAPI, ref: SovraMachineTemplate, want: []string{"takes no sovra kind"}},
		{name: "missing kind on a machine", group: capiGroup, kind: "Machine", path: infraRef, op: admissionv1.Create,
			apiVersion: "infrastructure.cluster.x-k8s.io/v1beta1", ref: "AWSMachine", want: []string{"awsmachines.infrastructure.cluster.x-k8s.io"}},
		{name: "unchanged on update", group: capiGroup, kind: "Cluster", path: infraRef, op: admissionv1.Update,
			apiVersion: infraAPI, ref: "AzureCluster", oldRef: "AzureCluster", allowed: true},
		{name: "changed on update", group: capiGroup, kind: "Cluster", path: infraRef, op: admissionv1.Update,
			apiVersion: infraAPI, ref: "AzureCluster", oldRef: SovraCluster, want: []string{"AzureCluster"}},
		{name: "being deleted", group: capiGroup, kind: "Cluster", path: infraRef, op: admissionv1.Update,
			apiVersion: infraAPI, ref: "AzureCluster", oldRef: SovraCluster, deleting: true, allowed: true},
		{name: "no reference", group: capiGroup, kind: "Cluster", path: infraRef, op: admissionv1.Create, allowed: true},
		{name: "another kind", group: capiGroup, kind: "MachineHealthCheck", path: infraRef, op: admissionv1.Create,
			apiVersion: infraAPI, ref: "AzureCluster", allowed: true},
		{name: "bad apiVersion", group: capiGroup, kind: "Cluster", path: infraRef, op: admissionv1.Create,
			apiVersion: "a/b/c", ref: "AzureCluster", want: []string{"spec.infrastructureRef.apiVersion"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var old []byte
			if c.op == admissionv1.Update {
				old = object(t, c.group, c.kind, c.path, c.apiVersion, c.oldRef, false)
			}
			resp := v.Handle(context.Background(), request(c.group, c.kind, c.op, object(t, c.group, c.kind, c.path, c.apiVersion, c.ref, c.deleting), old))
			if resp.Allowed != c.allowed {
				t.Fatalf("allowed = %v, want %v (%+v)", resp.Allowed, c.allowed, resp.Result)
			}
			if c.allowed {
				return
			}
			if resp.Result == nil || resp.Result.Reason != metav1.StatusReasonInvalid {
				t.Fatalf("refused without an Invalid status: %+v", resp.Result)
			}
			for _, w := range c.want {
				if !strings.Contains(resp.Result.Message, w) {
					t.Errorf("message %q does not say %q", resp.Result.Message, w)
				}
			}
		})
	}
}

// TestRegistration: one webhook, on every referring kind, create and update,
// failing closed with no side effects.
func TestRegistration(t *testing.T) {
	reg := Registration()
	if len(reg.Webhooks) != 1 {
		t.Fatalf("want one webhook, got %d", len(reg.Webhooks))
	}
	w := reg.Webhooks[0]
	if *w.ClientConfig.Service.Path != Path || *w.FailurePolicy != "Fail" || *w.SideEffects != "None" || *w.TimeoutSeconds > 10 {
		t.Errorf("webhook settings: %+v", w)
	}
	var got []string
	for _, r := range w.Rules {
		if len(r.Operations) != 2 {
			t.Errorf("rule %v: operations %v", r.APIGroups, r.Operations)
		}
		for _, res := range r.Resources {
			got = append(got, r.APIGroups[0]+"/"+r.APIVersions[0]+"/"+res)
		}
	}
	want := "cluster.x-k8s.io/v1beta1/clusters cluster.x-k8s.io/v1beta1/machinedeployments cluster.x-k8s.io/v1beta1/machinepools " +
		"cluster.x-k8s.io/v1beta1/machines cluster.x-k8s.io/v1beta1/machinesets controlplane.cluster.x-k8s.io/v1alpha3/taloscontrolplanes"
	if strings.Join(got, " ") != want {
		t.Errorf("rules cover %q, want %q", strings.Join(got, " "), want)
	}
}
