package infra

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/go-logr/logr"
	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/record"
	clusterv1 "sigs.k8s.io/cluster-api/api/v1beta1"
	"sigs.k8s.io/cluster-api/util"
	"sigs.k8s.io/cluster-api/util/annotations"
	"sigs.k8s.io/cluster-api/util/conditions"
	"sigs.k8s.io/cluster-api/util/finalizers"
	"sigs.k8s.io/cluster-api/util/patch"
	"sigs.k8s.io/cluster-api/util/predicates"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	infrav1 "github.com/sovra-dev/sovra/daemon/apis/infrastructure/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/hosts"
	"github.com/sovra-dev/sovra/daemon/metrics"
)

const (
	// requeueSoon paces the waits of a machine (for a host, for the
	// bootstrap data, for its host to run the configuration).
	requeueSoon = 5 * time.Second
	// noHostRetry paces the search for a host when none is available.
	noHostRetry = 10 * time.Second
	// machineConcurrency is how many machines reconcile at once, as many
	// as Cluster API's own controllers in sovrad (daemon/capi).
	machineConcurrency = 10
)

// MachineReconciler reconciles SovraMachines: it claims hosts for them and
// releases the hosts of deleted ones.
type MachineReconciler struct {
	Client client.Client
	// APIReader reads hosts from the API, not the cache, when claiming.
	APIReader client.Reader
	Events    record.EventRecorder
	Logger    *zap.Logger
}

// SetupWithManager registers the reconciler.
func (r *MachineReconciler) SetupWithManager(mgr ctrl.Manager, log logr.Logger) error {
	return ctrl.NewControllerManagedBy(mgr).
		For(&infrav1.SovraMachine{}).
		WithEventFilter(predicates.ResourceNotPaused(mgr.GetScheme(), log)).
		Watches(&clusterv1.Machine{}, handler.EnqueueRequestsFromMapFunc(
			util.MachineToInfrastructureMapFunc(infrav1.GroupVersion.WithKind("SovraMachine")))).
		Watches(&v1alpha1.Host{}, handler.EnqueueRequestsFromMapFunc(hostToMachine)).
		Named("sovramachine").
		// Claims are resourceVersion-guarded writes of hosts tried in random
		// order: machines may claim side by side.
		WithOptions(controller.Options{MaxConcurrentReconciles: machineConcurrency}).
		Complete(r)
}

// hostToMachine maps a host to the machine that holds it.
func hostToMachine(_ context.Context, o client.Object) []reconcile.Request {
	h, ok := o.(*v1alpha1.Host)
	if !ok || h.Spec.ConsumerRef == nil {
		return nil
	}
	return []reconcile.Request{{NamespacedName: types.NamespacedName{Namespace: h.Spec.ConsumerRef.Namespace, Name: h.Spec.ConsumerRef.Name}}}
}

// Reconcile implements reconcile.Reconciler.
func (r *MachineReconciler) Reconcile(ctx context.Context, req ctrl.Request) (_ ctrl.Result, retErr error) {
	var sm infrav1.SovraMachine
	if err := r.Client.Get(ctx, req.NamespacedName, &sm); err != nil {
		if apierrors.IsNotFound(err) {
			return ctrl.Result{}, nil
		}
		return ctrl.Result{}, err
	}
	if added, err := finalizers.EnsureFinalizer(ctx, r.Client, &sm, infrav1.MachineFinalizer); err != nil || added {
		return ctrl.Result{}, err
	}
	machine, err := util.GetOwnerMachine(ctx, r.Client, sm.ObjectMeta)
	if err != nil {
		return ctrl.Result{}, err
	}
	var cluster *clusterv1.Cluster
	if machine != nil {
		if cluster, err = util.GetClusterFromMetadata(ctx, r.Client, machine.ObjectMeta); err != nil && !apierrors.IsNotFound(err) {
			return ctrl.Result{}, err
		}
	}
	if cluster != nil && annotations.IsPaused(cluster, &sm) {
		return ctrl.Result{}, nil
	}
	helper, err := patch.NewHelper(&sm, r.Client)
	if err != nil {
		return ctrl.Result{}, err
	}
	defer func() {
		if sm.DeletionTimestamp.IsZero() {
			// Ready summarises the steps, so that the Machine (and
			// `clusterctl describe cluster`) says why the machine waits.
			conditions.SetSummary(&sm, conditions.WithConditions(infrav1.HostClaimedCondition, infrav1.HostProvisionedCondition))
		}
		if err := helper.Patch(ctx, &sm, patch.WithOwnedConditions{Conditions: []clusterv1.ConditionType{
			clusterv1.ReadyCondition, infrav1.HostClaimedCondition, infrav1.HostProvisionedCondition,
		}}); err != nil && retErr == nil {
			retErr = err
		}
	}()
	if !sm.DeletionTimestamp.IsZero() {
		return r.reconcileDelete(ctx, &sm)
	}
	return r.reconcileNormal(ctx, &sm, machine, cluster)
}

// reconcileNormal claims a host, then mirrors it.
func (r *MachineReconciler) reconcileNormal(ctx context.Context, sm *infrav1.SovraMachine, machine *clusterv1.Machine, cluster *clusterv1.Cluster) (ctrl.Result, error) {
	switch {
	case machine == nil:
		conditions.MarkFalse(sm, infrav1.HostClaimedCondition, infrav1.WaitingForHostReason, clusterv1.ConditionSeverityInfo, "waiting for a Machine to own it")
		return ctrl.Result{}, nil
	case cluster == nil || !cluster.Status.InfrastructureReady:
		conditions.MarkFalse(sm, infrav1.HostClaimedCondition, infrav1.WaitingForClusterReason, clusterv1.ConditionSeverityInfo, "waiting for the cluster's infrastructure")
		return ctrl.Result{RequeueAfter: requeueSoon}, nil
	case machine.Spec.Bootstrap.DataSecretName == nil:
		conditions.MarkFalse(sm, infrav1.HostClaimedCondition, infrav1.WaitingForBootstrapDataReason, clusterv1.ConditionSeverityInfo, "waiting for the Machine's bootstrap data")
		return ctrl.Result{RequeueAfter: requeueSoon}, nil
	}
	host, err := r.hostOf(ctx, sm)
	if err != nil {
		return ctrl.Result{}, err
	}
	if host == nil {
		if host, err = r.claim(ctx, sm, cluster.Name); err != nil {
			return ctrl.Result{}, err
		}
		if host == nil {
			conditions.MarkFalse(sm, infrav1.HostClaimedCondition, infrav1.NoHostAvailableReason, clusterv1.ConditionSeverityWarning,
				"no accepted, attested host is available whose labels match the host selector")
			return ctrl.Result{RequeueAfter: noHostRetry}, nil
		}
	}
	sm.Status.HostRef = &corev1.ObjectReference{APIVersion: v1alpha1.GroupVersion.String(), Kind: "Host", Name: host.Name, UID: host.UID}
	id := hosts.ProviderID(host.Name)
	sm.Spec.ProviderID = &id
	// The node joins the cluster's election before the machine has an
	// address: the bootstrap fence, which waits for every control-plane
	// Machine's address, then sees it labelled and gives its agent the
	// grace period instead of letting CACPPT bootstrap at once.
	conflict, err := r.labelNode(ctx, host.Name, cluster.Name, claimOf(sm.Namespace, sm.Name))
	if err != nil {
		return ctrl.Result{}, err
	}
	if conflict != "" {
		sm.Status.Addresses, sm.Status.Ready = nil, false
		conditions.MarkFalse(sm, infrav1.HostClaimedCondition, infrav1.ClusterLabelConflictReason, clusterv1.ConditionSeverityError, "%s", conflict)
		if r.Events != nil {
			r.Events.Event(sm, corev1.EventTypeWarning, infrav1.ClusterLabelConflictReason, conflict)
		}
		r.Logger.Warn("claimed host's node is labelled with another cluster: not labelling it, the machine waits", zap.String("host", host.Name),
			zap.String("machine", sm.Namespace+"/"+sm.Name), zap.String("reason", conflict))
		return ctrl.Result{RequeueAfter: noHostRetry}, nil
	}
	conditions.MarkTrue(sm, infrav1.HostClaimedCondition)
	sm.Status.Addresses = nil
	for _, a := range host.Status.Addresses {
		sm.Status.Addresses = append(sm.Status.Addresses, clusterv1.MachineAddress{Type: clusterv1.MachineInternalIP, Address: a})
	}
	if r := sm.Status.FailureReason; r != nil && *r == infrav1.HostFailedReason {
		// Set by an earlier sovrad for a failed host: recoverable, so no
		// failure of the contract's kind.
		sm.Status.FailureReason, sm.Status.FailureMessage = nil, nil
	}
	switch host.Status.Phase {
	case v1alpha1.HostProvisioned:
		sm.Status.Ready = true
		conditions.MarkTrue(sm, infrav1.HostProvisionedCondition)
		return ctrl.Result{}, nil
	case v1alpha1.HostFailed:
		// Not a failureReason: by the Cluster API contract that is a
		// terminal failure (the Machine stays Failed until it is deleted),
		// and a host that attests again and is accepted again recovers.
		conditions.MarkFalse(sm, infrav1.HostProvisionedCondition, infrav1.HostFailedReason, clusterv1.ConditionSeverityError,
			"host %s failed attestation; it gets no configuration until it attests again and is accepted again", host.Name)
		return ctrl.Result{}, nil
	}
	conditions.MarkFalse(sm, infrav1.HostProvisionedCondition, infrav1.WaitingForHostReason, clusterv1.ConditionSeverityInfo,
		"host %s is %s", host.Name, orPending(host.Status.Phase))
	return ctrl.Result{RequeueAfter: requeueSoon}, nil
}

func orPending(p v1alpha1.HostPhase) v1alpha1.HostPhase {
	if p == "" {
		return v1alpha1.HostClaimed
	}
	return p
}

// hostOf returns the host that names sm as its consumer, if any (a claim
// that was made before sm's status was written is found here too).
func (r *MachineReconciler) hostOf(ctx context.Context, sm *infrav1.SovraMachine) (*v1alpha1.Host, error) {
	if sm.Status.HostRef != nil {
		var h v1alpha1.Host
		err := r.APIReader.Get(ctx, client.ObjectKey{Name: sm.Status.HostRef.Name}, &h)
		switch {
		case err == nil && consumes(&h, sm):
			return &h, nil
		case err != nil && !apierrors.IsNotFound(err):
			return nil, err
		}
		// Lost (revoked, or released by an operator): its node leaves
		// the cluster.
		if err := r.unlabelNode(ctx, sm.Status.HostRef.Name, claimOf(sm.Namespace, sm.Name)); err != nil {
			return nil, err
		}
		sm.Status.HostRef, sm.Spec.ProviderID = nil, nil
	}
	var list v1alpha1.HostList
	if err := r.APIReader.List(ctx, &list); err != nil {
		return nil, fmt.Errorf("listing hosts: %w", err)
	}
	for i := range list.Items {
		if consumes(&list.Items[i], sm) {
			return &list.Items[i], nil
		}
	}
	return nil, nil
}

func consumes(h *v1alpha1.Host, sm *infrav1.SovraMachine) bool {
	ref := h.Spec.ConsumerRef
	return ref != nil && ref.UID == sm.UID && ref.Namespace == sm.Namespace && ref.Name == sm.Name
}

// claim takes one available host whose labels match sm's selector: the
// write of its consumerRef carries its resourceVersion, so of several
// machines (on any replica) that try one host, one wins and the others try
// another. Candidates are tried in random order, so racing machines mostly
// try different hosts.
func (r *MachineReconciler) claim(ctx context.Context, sm *infrav1.SovraMachine, cluster string) (*v1alpha1.Host, error) {
	sel := labels.Everything()
	if sm.Spec.HostSelector != nil {
		var err error
		if sel, err = metav1.LabelSelectorAsSelector(sm.Spec.HostSelector); err != nil {
			return nil, fmt.Errorf("the host selector of %s does not parse: %w", sm.Name, err)
		}
	}
	var list v1alpha1.HostList
	if err := r.APIReader.List(ctx, &list, client.MatchingLabelsSelector{Selector: sel}); err != nil {
		return nil, fmt.Errorf("listing hosts: %w", err)
	}
	cands := list.Items[:0]
	for _, h := range list.Items {
		if h.Spec.ConsumerRef == nil && h.Spec.Accepted && h.Status.Phase == v1alpha1.HostAvailable && !r.labelledElsewhere(ctx, h.Name, cluster) {
			cands = append(cands, h)
		}
	}
	rand.Shuffle(len(cands), func(i, j int) { cands[i], cands[j] = cands[j], cands[i] })
	for i := range cands {
		h := &cands[i]
		h.Spec.ConsumerRef = &corev1.ObjectReference{APIVersion: infrav1.GroupVersion.String(), Kind: "SovraMachine",
			Namespace: sm.Namespace, Name: sm.Name, UID: sm.UID}
		err := r.Client.Update(ctx, h) // the host's resourceVersion: one claim wins
		switch {
		case err == nil:
			metrics.HostClaims.WithLabelValues("claimed").Inc()
			r.Logger.Info("host claimed", zap.String("host", h.Name), zap.String("machine", sm.Namespace+"/"+sm.Name))
			r.event(h, corev1.EventTypeNormal, "HostClaimed", "claimed by machine "+sm.Namespace+"/"+sm.Name)
			return h, nil
		case apierrors.IsConflict(err), apierrors.IsNotFound(err):
			metrics.HostClaims.WithLabelValues("lost").Inc()
			continue // another machine was faster: try the next
		default:
			return nil, fmt.Errorf("claiming host %s: %w", h.Name, err)
		}
	}
	metrics.HostClaims.WithLabelValues("none").Inc()
	return nil, nil
}

// reconcileDelete releases the machine's host, then lets the machine go.
func (r *MachineReconciler) reconcileDelete(ctx context.Context, sm *infrav1.SovraMachine) (ctrl.Result, error) {
	host, err := r.hostOf(ctx, sm)
	if err != nil {
		return ctrl.Result{}, err
	}
	if host != nil {
		if err := hosts.Release(ctx, r.Client, r.Events, r.Logger, host, sm.Namespace+"/"+sm.Name, time.Now()); err != nil {
			if errors.Is(err, context.Canceled) {
				return ctrl.Result{}, nil
			}
			return ctrl.Result{}, err
		}
		if err := r.unlabelNode(ctx, host.Name, claimOf(sm.Namespace, sm.Name)); err != nil {
			return ctrl.Result{}, err
		}
	}
	controllerutil.RemoveFinalizer(sm, infrav1.MachineFinalizer)
	return ctrl.Result{}, nil
}

func (r *MachineReconciler) event(h *v1alpha1.Host, typ, reason, msg string) {
	if r.Events != nil {
		r.Events.Event(h, typ, reason, msg)
	}
}
