// Package infra is sovra's Cluster API infrastructure provider, run
// in-process in the Cluster API manager: a SovraCluster carries the
// control-plane endpoint its user gives, and a SovraMachine claims one
// accepted, attested, available host of sovra's pool whose labels match its
// host selector (atomically: the claim is a write of the Host's consumerRef
// with the Host's resourceVersion), reports its provider ID and addresses,
// and is ready once the host runs its Machine's configuration (package
// hosts releases it). Deleting a SovraMachine releases its host: the host's
// disk keys are shredded and it wipes itself and returns to the pool.
// Both reconcilers follow Cluster API's skeleton: get, ensure the
// finalizer, a patch helper with a deferred patch, then reconcileDelete or
// reconcileNormal.
package infra

import (
	"context"
	"fmt"

	"github.com/go-logr/logr"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	clusterv1 "sigs.k8s.io/cluster-api/api/v1beta1"
	"sigs.k8s.io/cluster-api/util"
	"sigs.k8s.io/cluster-api/util/annotations"
	"sigs.k8s.io/cluster-api/util/conditions"
	"sigs.k8s.io/cluster-api/util/finalizers"
	"sigs.k8s.io/cluster-api/util/patch"
	"sigs.k8s.io/cluster-api/util/predicates"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/handler"

	infrav1 "github.com/sovra-dev/sovra/daemon/apis/infrastructure/v1alpha1"
)

// EndpointReason says why a SovraCluster is not ready.
const noEndpointReason = "NoControlPlaneEndpoint"

// ClusterReconciler reconciles SovraClusters.
type ClusterReconciler struct {
	Client client.Client
}

// SetupWithManager registers the reconciler.
func (r *ClusterReconciler) SetupWithManager(mgr ctrl.Manager, log logr.Logger) error {
	return ctrl.NewControllerManagedBy(mgr).
		For(&infrav1.SovraCluster{}).
		WithEventFilter(predicates.ResourceNotPaused(mgr.GetScheme(), log)).
		Watches(&clusterv1.Cluster{}, handler.EnqueueRequestsFromMapFunc(
			util.ClusterToInfrastructureMapFunc(context.Background(), infrav1.GroupVersion.WithKind("SovraCluster"), mgr.GetClient(), &infrav1.SovraCluster{})),
			builder.WithPredicates(predicates.ClusterUnpaused(mgr.GetScheme(), log))).
		Named("sovracluster").
		Complete(r)
}

// Reconcile implements reconcile.Reconciler.
func (r *ClusterReconciler) Reconcile(ctx context.Context, req ctrl.Request) (_ ctrl.Result, retErr error) {
	var sc infrav1.SovraCluster
	if err := r.Client.Get(ctx, req.NamespacedName, &sc); err != nil {
		if apierrors.IsNotFound(err) {
			return ctrl.Result{}, nil
		}
		return ctrl.Result{}, err
	}
	if added, err := finalizers.EnsureFinalizer(ctx, r.Client, &sc, infrav1.ClusterFinalizer); err != nil || added {
		return ctrl.Result{}, err
	}
	cluster, err := util.GetOwnerCluster(ctx, r.Client, sc.ObjectMeta)
	if err != nil {
		return ctrl.Result{}, err
	}
	if cluster != nil && annotations.IsPaused(cluster, &sc) {
		return ctrl.Result{}, nil
	}
	helper, err := patch.NewHelper(&sc, r.Client)
	if err != nil {
		return ctrl.Result{}, err
	}
	defer func() {
		if err := helper.Patch(ctx, &sc, patch.WithOwnedConditions{Conditions: []clusterv1.ConditionType{clusterv1.ReadyCondition}}); err != nil && retErr == nil {
			retErr = err
		}
	}()
	if !sc.DeletionTimestamp.IsZero() {
		return r.reconcileDelete(ctx, &sc)
	}
	return r.reconcileNormal(&sc)
}

// reconcileNormal: the cluster's infrastructure is its endpoint.
func (r *ClusterReconciler) reconcileNormal(sc *infrav1.SovraCluster) (ctrl.Result, error) {
	if sc.Spec.ControlPlaneEndpoint.Host == "" || sc.Spec.ControlPlaneEndpoint.Port == 0 {
		sc.Status.Ready = false
		conditions.MarkFalse(sc, clusterv1.ReadyCondition, noEndpointReason, clusterv1.ConditionSeverityError,
			"set spec.controlPlaneEndpoint to the control plane's VIP, DNS name or load balancer (host and port)")
		return ctrl.Result{}, nil
	}
	sc.Status.Ready = true
	conditions.MarkTrue(sc, clusterv1.ReadyCondition)
	return ctrl.Result{}, nil
}

// reconcileDelete waits for the cluster's machines, whose hosts it releases.
func (r *ClusterReconciler) reconcileDelete(ctx context.Context, sc *infrav1.SovraCluster) (ctrl.Result, error) {
	var machines infrav1.SovraMachineList
	if err := r.Client.List(ctx, &machines, client.InNamespace(sc.Namespace),
		client.MatchingLabels{clusterv1.ClusterNameLabel: sc.Labels[clusterv1.ClusterNameLabel]}); err != nil {
		return ctrl.Result{}, fmt.Errorf("listing the machines of %s: %w", sc.Name, err)
	}
	if n := len(machines.Items); n > 0 && sc.Labels[clusterv1.ClusterNameLabel] != "" {
		return ctrl.Result{RequeueAfter: requeueSoon}, nil
	}
	controllerutil.RemoveFinalizer(sc, infrav1.ClusterFinalizer)
	return ctrl.Result{}, nil
}
