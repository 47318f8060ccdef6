package hosts

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/hosts/talosadmin"
)

// What sovrad does through a worker's Talos API.
const (
	// actionBackoff is the wait after a failed call; it doubles with every
	// further one, up to maxActionBackoff.
	actionBackoff    = 5 * time.Second
	maxActionBackoff = 5 * time.Minute
	// clusterTalosconfigSuffix and clusterTalosconfigKey name the
	// talosconfig the Talos bootstrap provider keeps per cluster
	// (<cluster>-talosconfig, "talosconfig"), which the Talos control-plane
	// provider uses to reach control-plane nodes from sovrad too.
	clusterTalosconfigSuffix = "-talosconfig"
	clusterTalosconfigKey    = "talosconfig"
	// Reasons of the DaemonAction condition and of its events.
	ReasonDaemonApplied = "DaemonApplied"
	ReasonDaemonReset   = "DaemonReset"
	ReasonDaemonFailed  = "DaemonActionFailed"
)

// TalosAdmin changes a worker's Talos through its API, with its cluster's
// talosconfig; talosadmin.Client implements it. Its errors carry neither
// the configuration nor key material.
type TalosAdmin interface {
	ApplyConfiguration(ctx context.Context, talosconfig []byte, node talosadmin.Node, config []byte) error
	Reset(ctx context.Context, talosconfig []byte, node talosadmin.Node) error
}

// daemonResets reports whether sovrad, not the host's agent, resets a
// Releasing host: a worker (its agent holds an os:reader certificate) that
// runs its configuration.
func daemonResets(st *v1alpha1.HostStatus) bool {
	return st.Phase == v1alpha1.HostReleasing && st.TalosActor == v1alpha1.TalosActorDaemon && st.Mode == ModeConfigured
}

// requestReset records a Reset of the host's current boot, unless one is
// recorded already.
func requestReset(st *v1alpha1.HostStatus, now time.Time) {
	if a := st.DaemonAction; a != nil && a.Type == v1alpha1.DaemonActionReset && a.Boot == st.Boot {
		return
	}
	st.DaemonAction = &v1alpha1.HostDaemonAction{Type: v1alpha1.DaemonActionReset, Boot: st.Boot, Requested: metav1.NewTime(now)}
}

// backoff is the wait after the attempts-th failed call.
func backoff(attempts int32) time.Duration {
	d := actionBackoff
	for i := int32(1); i < attempts && d < maxActionBackoff; i++ {
		d *= 2
	}
	return min(d, maxActionBackoff)
}

// act does the host's pending daemon action (status.daemonAction): it
// records the attempt first (with the host's resourceVersion, so that of
// two writers one calls), calls the worker's Talos API with its cluster's
// talosconfig, and records the outcome as the DaemonAction condition, an
// event and a log line; a failed call is retried with backoff, a done one
// never again. The reconciler runs on the leader only.
func (r *Reconciler) act(ctx context.Context, host *v1alpha1.Host, rec *v1alpha1.SovraNode, now time.Time) (ctrl.Result, error) {
	st := host.Status.DeepCopy()
	if daemonResets(st) {
		requestReset(st, now)
	}
	a := st.DaemonAction
	switch {
	case a == nil || a.Done != nil:
		return ctrl.Result{}, r.writeIfChanged(ctx, host, st)
	case a.Boot != st.Boot, a.Type == v1alpha1.DaemonActionApply && (host.Spec.ConsumerRef == nil || !host.Spec.Accepted || a.Generation != st.ReleasedGeneration):
		// The host booted since, lost its claim or its acceptance, or a
		// newer generation superseded this one: nothing to do.
		st.DaemonAction = nil
		return ctrl.Result{}, r.writeIfChanged(ctx, host, st)
	case a.Type == v1alpha1.DaemonActionApply && !rec.AttestedOK():
		return ctrl.Result{}, r.writeIfChanged(ctx, host, st) // the reconciler withdraws the acceptance
	}
	if a.LastAttempt != nil {
		if wait := a.LastAttempt.Add(backoff(a.Attempts)).Sub(now); wait > 0 {
			return ctrl.Result{RequeueAfter: wait}, r.writeIfChanged(ctx, host, st)
		}
	}
	a.Attempts++
	a.LastAttempt = &metav1.Time{Time: now}
	host.Status = *st
	if err := r.Client.Status().Update(ctx, host); err != nil {
		return ctrl.Result{}, ignoreConflict(err) // another write won: act on what it wrote
	}
	what := actionText(a)
	r.Logger.Info("sovrad calls the worker's Talos API", zap.String("host", host.Name), zap.String("action", string(a.Type)),
		zap.Int64("generation", a.Generation), zap.Int32("attempt", a.Attempts), zap.Strings("addresses", st.Addresses))
	callErr := r.call(ctx, host, a)
	cond := metav1.Condition{Type: v1alpha1.HostConditionDaemonAction, LastTransitionTime: metav1.NewTime(r.now())}
	if callErr == nil {
		cond.Status, cond.Reason, cond.Message = metav1.ConditionTrue, ReasonDaemonApplied, "sovrad "+what+" through the host's Talos API"
		if a.Type == v1alpha1.DaemonActionReset {
			cond.Reason = ReasonDaemonReset
		}
		r.Logger.Info("sovrad "+what+" through the worker's Talos API", zap.String("host", host.Name), zap.Int32("attempt", a.Attempts))
		r.event(host, corev1.EventTypeNormal, cond.Reason, cond.Message)
	} else {
		retryIn := backoff(a.Attempts)
		cond.Status, cond.Reason = metav1.ConditionFalse, ReasonDaemonFailed
		cond.Message = fmt.Sprintf("sovrad could not %s through the host's Talos API (attempt %d, retry in %s): %v", actionVerb(a), a.Attempts, retryIn, callErr)
		r.Logger.Warn("sovrad's call to the worker's Talos API failed; retrying", zap.String("host", host.Name),
			zap.String("action", string(a.Type)), zap.Int32("attempt", a.Attempts), zap.Duration("retryIn", retryIn), zap.Error(callErr))
		r.event(host, corev1.EventTypeWarning, ReasonDaemonFailed, cond.Message)
	}
	// The outcome is written on a fresh read: the agent's Syncs write the
	// status meanwhile, and a lost "done" would repeat the call.
	err := retry.RetryOnConflict(retry.DefaultBackoff, func() error {
		var fresh v1alpha1.Host
		if err := r.reader().Get(ctx, client.ObjectKeyFromObject(host), &fresh); err != nil {
			return err
		}
		fa := fresh.Status.DaemonAction
		if fa == nil || fa.Type != a.Type || fa.Boot != a.Boot || fa.Generation != a.Generation {
			return nil // superseded meanwhile
		}
		if callErr == nil {
			fa.Done = &metav1.Time{Time: r.now()}
		}
		meta.SetStatusCondition(&fresh.Status.Conditions, cond)
		return r.Client.Status().Update(ctx, &fresh)
	})
	if err != nil && !apierrors.IsNotFound(err) {
		return ctrl.Result{}, fmt.Errorf("recording sovrad's action on host %s: %w", host.Name, err)
	}
	if callErr != nil {
		return ctrl.Result{RequeueAfter: backoff(a.Attempts)}, nil
	}
	return ctrl.Result{}, nil
}

// call makes the action's Talos call.
func (r *Reconciler) call(ctx context.Context, host *v1alpha1.Host, a *v1alpha1.HostDaemonAction) error {
	ns, _, _ := strings.Cut(host.Status.Machine, "/")
	if a.Type == v1alpha1.DaemonActionApply {
		ns = host.Spec.ConsumerRef.Namespace
	}
	talosconfig, err := r.clusterTalosconfig(ctx, ns, host.Status.Cluster)
	if err != nil {
		return err
	}
	if a.Type == v1alpha1.DaemonActionReset {
		return r.talos().Reset(ctx, talosconfig, talosNode(host))
	}
	if err := r.Daemon.Validate(); err != nil {
		return errors.New("this sovrad has no node API, so it cannot build the configuration: a leader with --node-listen applies it")
	}
	bootstrap, cluster, m, err := bootstrapData(ctx, r.reader(), host.Spec.ConsumerRef)
	if err != nil {
		return err
	}
	if bootstrapHash(bootstrap) != host.Status.ConfigHash {
		return errors.New("the machine's bootstrap data changed since this generation was released: waiting for the host's next sync")
	}
	merged, worker, err := releasedConfig(ctx, r.Client, r.Daemon, host, release{
		namespace: host.Spec.ConsumerRef.Namespace, cluster: cluster, machine: m, addresses: host.Status.Addresses, bootstrap: bootstrap, generation: a.Generation,
	}, r.now())
	if err != nil {
		return err
	}
	if !worker {
		return errors.New("the machine is not a worker: its agent applies its configuration")
	}
	return r.talos().ApplyConfiguration(ctx, talosconfig, talosNode(host), merged)
}

// talosNode is the host as sovrad calls it: the SMBIOS UUID its record
// holds (the machine proved it at enrollment) and the addresses it reported.
func talosNode(host *v1alpha1.Host) talosadmin.Node {
	return talosadmin.Node{UUID: host.Status.UUID, Addresses: host.Status.Addresses}
}

// clusterTalosconfig reads the cluster's talosconfig. Its content never
// leaves this package but to the Talos client.
func (r *Reconciler) clusterTalosconfig(ctx context.Context, ns, cluster string) ([]byte, error) {
	if ns == "" || cluster == "" {
		return nil, errors.New("the host names no cluster")
	}
	var sec corev1.Secret
	if err := r.reader().Get(ctx, client.ObjectKey{Namespace: ns, Name: cluster + clusterTalosconfigSuffix}, &sec); err != nil {
		return nil, fmt.Errorf("reading the talosconfig of cluster %s/%s: %w", ns, cluster, err)
	}
	tc := sec.Data[clusterTalosconfigKey]
	if len(tc) == 0 {
		return nil, fmt.Errorf("reading the talosconfig of cluster %s/%s: it is empty", ns, cluster)
	}
	return tc, nil
}

func (r *Reconciler) writeIfChanged(ctx context.Context, host *v1alpha1.Host, st *v1alpha1.HostStatus) error {
	if equalStatus(&host.Status, st) {
		return nil
	}
	host.Status = *st
	return ignoreConflict(r.Client.Status().Update(ctx, host))
}

func actionText(a *v1alpha1.HostDaemonAction) string {
	if a.Type == v1alpha1.DaemonActionApply {
		return fmt.Sprintf("applied configuration generation %d", a.Generation)
	}
	return "reset the machine (STATE and EPHEMERAL wiped, reboot into the enrollment configuration)"
}

func actionVerb(a *v1alpha1.HostDaemonAction) string {
	if a.Type == v1alpha1.DaemonActionApply {
		return fmt.Sprintf("apply configuration generation %d", a.Generation)
	}
	return "reset the machine"
}
