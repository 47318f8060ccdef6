package hosts

import (
	"context"
	"fmt"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/record"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/hosts/talosadmin"
	"github.com/sovra-dev/sovra/daemon/machineconfig"
)

// Reconciler keeps each Host's phase in step with its node's attestation
// and with the operator's acceptance: a host whose attestation fails, or
// whose node is quarantined, is taken out of the pool (Failed, no longer
// accepted, a condition and an event) and gets no configuration; it is
// Pending again once it attests and is not quarantined, and an operator
// accepts it again; accepting a Pending host makes it Available; a claim
// shows as Claimed at once. It also makes the calls on a worker's Talos API
// that need os:admin, which the worker's agent does not hold: a new
// configuration generation, and the reset of a released worker
// (daemonaction.go). It runs on the leader only.
type Reconciler struct {
	Client client.Client
	// APIReader reads what must be current (the host before recording an
	// action's outcome, bootstrap data, talosconfigs); nil means Client.
	APIReader client.Reader
	Events    record.EventRecorder
	Logger    *zap.Logger
	// Daemon is how machines reach sovrad, for the configurations sovrad
	// applies to workers; zero when this replica has no node API (such an
	// apply is retried, with a condition, until a leader that has one).
	Daemon machineconfig.Daemon
	// Talos calls workers' Talos APIs; nil means talosadmin.Client{}.
	Talos TalosAdmin
	// Clock tells the time; nil means the system clock.
	Clock Clock
}

func (r *Reconciler) now() time.Time {
	if r.Clock == nil {
		return time.Now()
	}
	return r.Clock.Now()
}

func (r *Reconciler) reader() client.Reader {
	if r.APIReader == nil {
		return r.Client
	}
	return r.APIReader
}

func (r *Reconciler) talos() TalosAdmin {
	if r.Talos == nil {
		return talosadmin.Client{}
	}
	return r.Talos
}

// SetupWithManager registers the reconciler; it also watches SovraNodes.
func (r *Reconciler) SetupWithManager(mgr ctrl.Manager) error {
	return ctrl.NewControllerManagedBy(mgr).
		For(&v1alpha1.Host{}).
		Watches(&v1alpha1.SovraNode{}, handler.EnqueueRequestsFromMapFunc(func(_ context.Context, o client.Object) []reconcile.Request {
			return []reconcile.Request{{NamespacedName: types.NamespacedName{Name: o.GetName()}}}
		})).
		Named("host").
		Complete(r)
}

// Reconcile implements reconcile.Reconciler.
func (r *Reconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	var host v1alpha1.Host
	if err := r.Client.Get(ctx, req.NamespacedName, &host); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	var rec v1alpha1.SovraNode
	if err := r.Client.Get(ctx, req.NamespacedName, &rec); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err) // revoked: the host goes with its owner
	}
	now := r.now()
	st := host.Status.DeepCopy()
	failed, reason, why := failure(&rec)
	// announce tells of the transition once its status write went
	// through: a reconcile that reads a cache the write has not reached
	// yet (the spec update below starts one) makes the same transition,
	// and its write conflicts.
	var announce func()
	switch {
	case failed && st.Phase != v1alpha1.HostFailed:
		if host.Spec.Accepted {
			host.Spec.Accepted = false
			if err := r.Client.Update(ctx, &host); err != nil {
				return ctrl.Result{}, ignoreConflict(err)
			}
		}
		st.Phase = v1alpha1.HostFailed
		msg := why + ": out of the pool, no configuration; accept it again once it attests"
		announce = func() {
			r.Logger.Warn("host failed attestation: out of the pool", zap.String("host", host.Name), zap.String("reason", reason))
			r.event(&host, corev1.EventTypeWarning, ReasonHostFailed, msg)
		}
	case !failed && st.Phase == v1alpha1.HostFailed && rec.AttestedOK():
		st.Phase = v1alpha1.HostPending
	case st.Phase == v1alpha1.HostPending && host.Spec.Accepted && host.Spec.ConsumerRef == nil:
		st.Phase = v1alpha1.HostAvailable
		announce = func() {
			r.Logger.Info("host accepted", zap.String("host", host.Name))
			r.event(&host, corev1.EventTypeNormal, ReasonAccepted, "accepted: available to be claimed")
		}
	case st.Phase == v1alpha1.HostAvailable && !host.Spec.Accepted:
		st.Phase = v1alpha1.HostPending
	case st.Phase == v1alpha1.HostAvailable && host.Spec.ConsumerRef != nil:
		st.Phase = v1alpha1.HostClaimed
		st.Machine = host.Spec.ConsumerRef.Namespace + "/" + host.Spec.ConsumerRef.Name
	}
	setAttested(st, &rec, now)
	if !equalStatus(&host.Status, st) && (st.Phase != host.Status.Phase ||
		meta.IsStatusConditionTrue(st.Conditions, v1alpha1.HostConditionAttested) != meta.IsStatusConditionTrue(host.Status.Conditions, v1alpha1.HostConditionAttested)) {
		host.Status = *st
		if err := r.Client.Status().Update(ctx, &host); err != nil {
			return ctrl.Result{}, ignoreConflict(err)
		}
		if announce != nil {
			announce()
		}
	}
	return r.act(ctx, &host, &rec, now)
}

// failure reports whether rec keeps its host out of the pool, and why: its
// last attestation failed, or the KMS quarantined it (a boot that unsealed
// and then failed attestation, or an unexpected key release where the KMS
// is told to quarantine). A quarantined node's credential is refused and it
// cannot unseal, so a claim of its host could never be served: it stays
// Failed, even once it attests again, until an operator clears the
// quarantine.
func failure(rec *v1alpha1.SovraNode) (failed bool, reason, msg string) {
	if c := meta.FindStatusCondition(rec.Status.Conditions, v1alpha1.ConditionQuarantined); c != nil && c.Status == metav1.ConditionTrue {
		return true, c.Reason, fmt.Sprintf("the node is quarantined (%s: %s); clear the quarantine", c.Reason, c.Message)
	}
	if rec.Status.LastAttestationResult == v1alpha1.ResultFailed {
		return true, rec.Status.Reason, fmt.Sprintf("the node's attestation failed (%s: %s)", rec.Status.Reason, rec.Status.Message)
	}
	return false, "", ""
}

// ignoreConflict requeues a conflicting write instead of failing it.
func ignoreConflict(err error) error {
	if apierrors.IsConflict(err) {
		return nil // the update that won triggers another reconcile
	}
	return err
}

func (r *Reconciler) event(h *v1alpha1.Host, typ, reason, msg string) {
	if r.Events != nil {
		r.Events.Event(h, typ, reason, msg)
	}
}
