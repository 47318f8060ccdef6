package infraref

import (
	"context"
	"fmt"
	"strings"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/record"
	clusterv1 "sigs.k8s.io/cluster-api/api/v1beta1"
	"sigs.k8s.io/cluster-api/util/annotations"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
)

const (
	// controllerName names the reconciler (and its events' source).
	controllerName = "cluster-missing-infrastructure"
	// descendantsRetry paces the wait for Cluster API to delete a Cluster's
	// machines and control plane.
	descendantsRetry = 10 * time.Second
	// ReleasedReason is the reason of the event on a released Cluster.
	ReleasedReason = "InfrastructureKindMissing"
)

// descendantLists are the kinds Cluster API's cluster controller waits for
// before it lets a Cluster go (clusterDescendants.objectsPendingDeleteCount):
// machine pools, machine deployments, machine sets and machines; all of them
// carry the cluster-name label.
var descendantLists = []schema.GroupVersionKind{
	clusterv1.GroupVersion.WithKind("MachineList"),
	clusterv1.GroupVersion.WithKind("MachineSetList"),
	clusterv1.GroupVersion.WithKind("MachineDeploymentList"),
	clusterv1.GroupVersion.WithKind("MachinePoolList"),
}

// MissingInfrastructureReconciler removes Cluster API's finalizer from a
// deleted Cluster whose infrastructure kind is no longer installed, once
// nothing else of the Cluster is left, so that it can be deleted without
// hand-editing finalizers.
//
// Cluster API v1.10 never finishes such a deletion by itself. Its cluster
// controller (sigs.k8s.io/cluster-api@v1.10.10,
// internal/controllers/cluster/cluster_controller.go, reconcileDelete) waits
// for the machine pools, deployments, sets and worker machines
// (objectsPendingDeleteCount), then for the control plane object to be gone
// (controlPlaneIsNotFound), and removes clusterv1.ClusterFinalizer only when
// the infrastructure cluster is gone too (infraClusterIsNotFound). That flag
// is set only when reading the infrastructure object fails with NotFound
// (cluster_controller_phases.go, reconcileInfrastructure); when the kind's
// CRD is missing, reconcileExternal fails earlier, in
// conversion.UpdateReferenceAPIContract, whose NotFound for the CRD it
// deliberately turns into a plain error ("We want to surface the NotFound
// error only for the referenced object"), so reconcileDelete returns with
// ClusterDeletingInternalErrorV1Beta2Reason on every reconcile, forever.
//
// This reconciler removes the finalizer in exactly that state: the Cluster
// is being deleted, it is not paused, its infrastructure kind's CRD does not
// exist (so no infrastructure object, and no controller of it, can be left
// to clean up), none of the descendants above remains, and its control plane
// object is gone (or its kind is gone too). Everything else the Cluster owns
// goes with it through garbage collection, as it does after Cluster API
// removes the finalizer.
type MissingInfrastructureReconciler struct {
	// Client patches Clusters and maps control-plane kinds (its REST mapper).
	Client client.Client
	// APIReader reads CRDs and descendants from the API, not a cache.
	APIReader client.Reader
	Events    record.EventRecorder
	Logger    *zap.Logger
}

// SetupWithManager registers the reconciler: it sees Clusters that are being
// deleted, and again when a CRD is deleted (the kind a deleted Cluster
// waits on may be the one that went).
func (r *MissingInfrastructureReconciler) SetupWithManager(mgr ctrl.Manager) error {
	deleting := predicate.NewPredicateFuncs(func(o client.Object) bool { return !o.GetDeletionTimestamp().IsZero() })
	crdDeleted := predicate.Funcs{
		CreateFunc:  func(event.CreateEvent) bool { return false },
		UpdateFunc:  func(event.UpdateEvent) bool { return false },
		GenericFunc: func(event.GenericEvent) bool { return false },
		DeleteFunc:  func(event.DeleteEvent) bool { return true },
	}
	return ctrl.NewControllerManagedBy(mgr).
		Named(controllerName).
		For(&clusterv1.Cluster{}, builder.WithPredicates(deleting)).
		WatchesMetadata(&apiextensionsv1.CustomResourceDefinition{}, handler.EnqueueRequestsFromMapFunc(r.clustersWaitingOn),
			builder.WithPredicates(crdDeleted)).
		Complete(r)
}

// clustersWaitingOn maps a deleted CRD to the deleted Clusters whose
// infrastructure kind it defined.
func (r *MissingInfrastructureReconciler) clustersWaitingOn(ctx context.Context, crd client.Object) []reconcile.Request {
	var list clusterv1.ClusterList
	if err := r.Client.List(ctx, &list); err != nil {
		r.Logger.Warn("listing clusters for a deleted CRD", zap.String("crd", crd.GetName()), zap.Error(err))
		return nil
	}
	var out []reconcile.Request
	for _, c := range list.Items {
		ref := c.Spec.InfrastructureRef
		if c.DeletionTimestamp.IsZero() || ref == nil {
			continue
		}
		if crdName(ref.GroupVersionKind().GroupKind()) == crd.GetName() {
			out = append(out, reconcile.Request{NamespacedName: types.NamespacedName{Namespace: c.Namespace, Name: c.Name}})
		}
	}
	return out
}

// Reconcile implements reconcile.Reconciler.
func (r *MissingInfrastructureReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	var cluster clusterv1.Cluster
	if err := r.APIReader.Get(ctx, req.NamespacedName, &cluster); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	ref := cluster.Spec.InfrastructureRef
	if cluster.DeletionTimestamp.IsZero() || ref == nil ||
		!controllerutil.ContainsFinalizer(&cluster, clusterv1.ClusterFinalizer) || annotations.IsPaused(&cluster, &cluster) {
		return ctrl.Result{}, nil
	}
	infraGK := ref.GroupVersionKind().GroupKind()
	crd, err := lookupCRD(ctx, r.APIReader, infraGK)
	if err != nil || crd != nil {
		return ctrl.Result{}, err // installed (or terminating): Cluster API deletes it
	}
	left, err := r.leftovers(ctx, &cluster)
	if err != nil {
		return ctrl.Result{}, err
	}
	if len(left) > 0 {
		r.Logger.Debug("deleted cluster with missing infrastructure kind still has descendants",
			zap.String("cluster", req.String()), zap.Strings("left", left))
		return ctrl.Result{RequeueAfter: descendantsRetry}, nil
	}

	patch := client.MergeFromWithOptions(cluster.DeepCopy(), client.MergeFromWithOptimisticLock{})
	controllerutil.RemoveFinalizer(&cluster, clusterv1.ClusterFinalizer)
	if err := r.Client.Patch(ctx, &cluster, patch); err != nil {
		if apierrors.IsNotFound(err) {
			return ctrl.Result{}, nil
		}
		return ctrl.Result{}, fmt.Errorf("removing the finalizer of cluster %s: %w", req, err)
	}
	why := fmt.Sprintf("removed finalizer %s: the infrastructure kind %s (%s) is not installed (no CustomResourceDefinition %s), "+
		"so Cluster API cannot finish the deletion; no machines, machine sets, deployments, pools or control plane are left",
		clusterv1.ClusterFinalizer, infraGK.Kind, infraGK.Group, crdName(infraGK))
	r.Logger.Info("released deleted cluster whose infrastructure kind is missing", zap.String("cluster", req.String()),
		zap.String("kind", infraGK.String()), zap.String("crd", crdName(infraGK)))
	if r.Events != nil {
		r.Events.Event(&cluster, corev1.EventTypeNormal, ReleasedReason, why)
	}
	return ctrl.Result{}, nil
}

// leftovers names what Cluster API still waits for before the
// infrastructure: descendants, then the control plane object.
func (r *MissingInfrastructureReconciler) leftovers(ctx context.Context, cluster *clusterv1.Cluster) ([]string, error) {
	var left []string
	for _, gvk := range descendantLists {
		list := &metav1.PartialObjectMetadataList{}
		list.SetGroupVersionKind(gvk)
		if err := r.APIReader.List(ctx, list, client.InNamespace(cluster.Namespace),
			client.MatchingLabels{clusterv1.ClusterNameLabel: cluster.Name}); err != nil {
			if meta.IsNoMatchError(err) {
				continue // a kind that is not installed has no objects
			}
			return nil, fmt.Errorf("listing the %s of cluster %s/%s: %w", gvk.Kind, cluster.Namespace, cluster.Name, err)
		}
		for _, o := range list.Items {
			left = append(left, strings.TrimSuffix(gvk.Kind, "List")+"/"+o.Name)
		}
	}
	ref := cluster.Spec.ControlPlaneRef
	if ref == nil {
		return left, nil
	}
	// The reference may still name the contract version (v1beta1), which
	// the control plane's CRD need not serve: find the kind at any version.
	gk := ref.GroupVersionKind().GroupKind()
	mapping, err := r.Client.RESTMapper().RESTMapping(gk)
	if meta.IsNoMatchError(err) {
		return left, nil // the control plane's kind is gone too: so is its object
	}
	if err != nil {
		return nil, fmt.Errorf("mapping control plane kind %s: %w", gk, err)
	}
	cp := &metav1.PartialObjectMetadata{}
	cp.SetGroupVersionKind(mapping.GroupVersionKind)
	err = r.APIReader.Get(ctx, client.ObjectKey{Namespace: cluster.Namespace, Name: ref.Name}, cp)
	switch {
	case apierrors.IsNotFound(err), meta.IsNoMatchError(err):
		return left, nil
	case err != nil:
		return nil, fmt.Errorf("reading control plane %s %s: %w", gk.Kind, ref.Name, err)
	}
	return append(left, gk.Kind+"/"+ref.Name), nil
}
