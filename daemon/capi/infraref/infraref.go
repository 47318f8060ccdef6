// Package infraref makes infrastructure references that sovrad cannot serve
// fail clearly instead of leaving a cluster stuck:
//
//   - a validating admission webhook (Validator, Registration) refuses a
//     Cluster, Machine, MachineSet, MachineDeployment, MachinePool or
//     TalosControlPlane whose infrastructure reference names a kind that is
//     neither one of sovra's (SovraCluster, SovraMachine,
//     SovraMachineTemplate) nor a kind whose CustomResourceDefinition is
//     installed in this API, and one that puts a sovra kind in the wrong
//     place (a SovraCluster on a Machine);
//   - a reconciler (MissingInfrastructureReconciler) lets a Cluster whose
//     infrastructure kind is gone be deleted, which Cluster API alone never
//     finishes.
//
// A kind counts as installed when the CRD that Cluster API itself looks up
// for it (named by contract.CalculateCRDName, read through the API rather
// than a cache) exists: what the webhook admits, Cluster API can resolve.
// Another provider's kinds are served once the operator installs its CRDs
// and runs its controllers against this API, as tests/capi's stand-in
// provider does.
package infraref

import (
	"context"
	"fmt"
	"slices"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/cluster-api/util/contract"
	"sigs.k8s.io/controller-runtime/pkg/client"

	infrav1 "github.com/sovra-dev/sovra/daemon/apis/infrastructure/v1alpha1"
)

// Sovra's infrastructure kinds.
const (
	SovraCluster         = "SovraCluster"
	SovraMachine         = "SovraMachine"
	SovraMachineTemplate = "SovraMachineTemplate"
)

// sovraKinds are the kinds sovrad serves itself, in the order messages name them.
var sovraKinds = []string{SovraCluster, SovraMachine, SovraMachineTemplate}

// isSovraKind reports whether gk is one of sovra's own kinds.
func isSovraKind(gk schema.GroupKind) bool {
	return gk.Group == infrav1.GroupVersion.Group && slices.Contains(sovraKinds, gk.Kind)
}

// crdName is the CRD Cluster API reads for gk (util.GetGVKMetadata).
func crdName(gk schema.GroupKind) string {
	return contract.CalculateCRDName(gk.Group, gk.Kind)
}

// lookupCRD reads the metadata of the CRD Cluster API resolves gk with,
// through r (the manager's API reader, so that a CRD installed or deleted a
// moment ago counts); nil means there is none.
func lookupCRD(ctx context.Context, r client.Reader, gk schema.GroupKind) (*metav1.PartialObjectMetadata, error) {
	crd := &metav1.PartialObjectMetadata{}
	crd.SetGroupVersionKind(apiextensionsv1.SchemeGroupVersion.WithKind("CustomResourceDefinition"))
	err := r.Get(ctx, client.ObjectKey{Name: crdName(gk)}, crd)
	switch {
	case apierrors.IsNotFound(err):
		return nil, nil
	case err != nil:
		return nil, fmt.Errorf("reading CRD %s: %w", crdName(gk), err)
	}
	return crd, nil
}
