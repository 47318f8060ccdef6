package infra

import (
	"context"
	"testing"

	"go.uber.org/zap"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/membership"
)

// TestClusterLabel: a claim puts the host's node in its cluster and owns
// the label; a release removes only the label it owns; an operator's label
// naming the same cluster is left the operator's, one naming another
// cluster is never overwritten (the conflict is returned, and such a host
// is not a candidate).
func TestClusterLabel(t *testing.T) {
	ctx := context.Background()
	scheme := runtime.NewScheme()
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	node := func(name string, labels map[string]string) *v1alpha1.SovraNode {
		return &v1alpha1.SovraNode{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
	}
	c := fake.NewClientBuilder().WithScheme(scheme).WithObjects(
		node("free", nil),
		node("same", map[string]string{membership.LabelCluster: "prod"}),
		node("other", map[string]string{membership.LabelCluster: "staging"}),
	).Build()
	r := &MachineReconciler{Client: c, APIReader: c, Logger: zap.NewNop()}
	get := func(name string) *v1alpha1.SovraNode {
		t.Helper()
		var n v1alpha1.SovraNode
		if err := c.Get(ctx, client.ObjectKey{Name: name}, &n); err != nil {
			t.Fatal(err)
		}
		return &n
	}
	const claim = "prod/m1"

	for _, name := range []string{"free", "same"} {
		if conflict, err := r.labelNode(ctx, name, "prod", claim); err != nil || conflict != "" {
			t.Fatalf("labelling %s: %q, %v", name, conflict, err)
		}
		if got := get(name).Labels[membership.LabelCluster]; got != "prod" {
			t.Errorf("%s: label %q, want prod", name, got)
		}
	}
	if got := get("free").Annotations[AnnotationClusterClaim]; got != claim {
		t.Errorf("free: claim annotation %q, want %q", got, claim)
	}
	if got := get("same").Annotations[AnnotationClusterClaim]; got != "" {
		t.Errorf("same: the operator's label became the provider's (%q)", got)
	}
	conflict, err := r.labelNode(ctx, "other", "prod", claim)
	if err != nil || conflict == "" {
		t.Fatalf("labelling a node an operator put in staging: %q, %v; want a conflict", conflict, err)
	}
	if got := get("other").Labels[membership.LabelCluster]; got != "staging" {
		t.Errorf("the operator's label was overwritten: %q", got)
	}
	if !r.labelledElsewhere(ctx, "other", "prod") || r.labelledElsewhere(ctx, "free", "prod") || r.labelledElsewhere(ctx, "same", "prod") {
		t.Error("labelledElsewhere: want only the node an operator put in another cluster")
	}
	// A label set by an earlier claim is the provider's: a new claim of
	// another cluster takes it over.
	if conflict, err := r.labelNode(ctx, "free", "dev", "dev/m2"); err != nil || conflict != "" {
		t.Fatalf("relabelling: %q, %v", conflict, err)
	}
	// A release of the old claim leaves the new one's label.
	if err := r.unlabelNode(ctx, "free", claim); err != nil {
		t.Fatal(err)
	}
	if got := get("free").Labels[membership.LabelCluster]; got != "dev" {
		t.Errorf("an old claim's release removed a later claim's label: %q", got)
	}
	for _, tc := range []struct{ node, claim, want string }{
		{"free", "dev/m2", ""},  // the owner's release removes it
		{"same", claim, "prod"}, // the operator's stays
		{"other", claim, "staging"},
		{"gone", claim, ""}, // a revoked node: nothing to do
	} {
		if err := r.unlabelNode(ctx, tc.node, tc.claim); err != nil {
			t.Fatal(err)
		}
		if tc.node == "gone" {
			continue
		}
		n := get(tc.node)
		if got := n.Labels[membership.LabelCluster]; got != tc.want {
			t.Errorf("after the release of %s: label %q, want %q", tc.node, got, tc.want)
		}
		if tc.want == "" && n.Annotations[AnnotationClusterClaim] != "" {
			t.Errorf("after the release of %s: the claim annotation stays", tc.node)
		}
	}
}
